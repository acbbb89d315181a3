"""The Ray Serve application of the real-time endpoint (``sdbatch serve``; with ``batch.run.pipeline`` the only
modules that import Ray).

    HTTP proxy -> Ingress (FastAPI: parse, plan, queue limit) -> SamplerReplica (Collector -> Sampler)

1. :class:`Ingress` (one replica): ``/health``, ``/ready``, ``/queue``, ``POST /generate`` (plain) and
   ``POST /score`` (catalogue). It parses and plans a request with :mod:`batch.serve.protocol` (400/413), counts
   the images accepted and not yet answered (429 above ``serve.max_queued_images``) and hands the request's
   items, whole, to the sampler deployment.
2. :class:`SamplerReplica` (``serve.replicas``: a number, or ``{min, max}`` for Serve autoscaling; one GPU each
   on cuda, a fraction of the CPUs on cpu, as the batch job's actors: :func:`batch.run.pipeline.resolve_resources`)
   holds the batch job's :class:`batch.run.stages.Sampler`. Its :class:`Collector` batches requests: while
   the sampler works, requests queue; when it is free it takes them up to ``serve.max_batch_size`` images
   (waiting at most ``serve.batch_wait_ms`` for more); :func:`batch.serve.protocol.collect_batch` sorts them
   by the batch job's bucket key and numbers GPU batches of
   at most ``batch_size``; the sampler makes one call per GPU batch (in a worker thread, so the replica keeps
   collecting and answering while it samples); :func:`batch.serve.protocol.split_batch` encodes each image with the
   batch writer's encoder and hands each request its rows.
3. A request whose client goes away is cancelled by Serve (proxy -> ingress -> replica): the collector drops it
   if it has not started; one cancelled during its batch's sampler call only loses its answer: the call, and
   the other requests of that batch, complete.

:func:`build_app` is the application builder a KubeRay RayService names (``import_path:
batch.serve.app:build_app``, ``args: {config: <spec path or URI>, set: {dotted: value}}``); :func:`serve_forever`
is ``sdbatch serve``.
"""

import asyncio
import collections
import json
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from batch.serve.protocol import (MAX_BODY_BYTES, RequestError, catalogue_response, check_servable, collect_batch,
                                  parse_catalogue, parse_plain, plain_response, plan_request, split_batch)
from batch.spec.config import JobSpec

APP_NAME = "sdbatch"
READY_TIMEOUT_S = 2.0  # /ready: how long a replica may take to answer before the endpoint says 503

api = FastAPI(title="sdbatch serve", description="Stable Diffusion on the batch job's sampler (README "
                                                 "\"Serving (real-time endpoint)\")")


class Collector:
    """Continuous request batching for one replica: requests (tables of items) queue while the sampler works;
    when it is free, the next batch takes the queued requests in arrival order up to ``max_images`` images
    (a request is never split: a larger one is a batch alone), waiting for more at most until ``wait_s`` after
    the oldest one arrived.

    Not ``@serve.batch``: Ray Serve's ``_BatchQueue`` (``ray/serve/batching.py``, ``_process_batches``) forms the
    next batch while the previous one still runs (its semaphore only gates execution), so requests that arrive
    during a sampler call are cut into batches of whatever came within ``batch_wait_timeout_s`` of each other,
    instead of one batch of everything that waited. Here the batch is formed when the sampler is free.

    A cancelled request (its caller's future cancelled: the client went away) is skipped if it has not started;
    if its batch is running, the batch completes for the other requests and only its answer is dropped.
    """

    def __init__(self, run_batch: Any, max_images: int, wait_s: float):
        self.run_batch = run_batch  # async (list of item tables) -> list of per-request results
        self.max_images, self.wait_s = max_images, wait_s
        self.pending: collections.deque = collections.deque()  # (items, future, arrival time), arrival order
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def submit(self, items: pa.Table) -> Any:
        """Queue one request's items; its rows once its batch has run."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        future = loop.create_future()
        self.pending.append((items, future, loop.time()))
        self.arrived.set()
        return await future

    def _queued_images(self) -> int:
        return sum(t.num_rows for t, f, _ in self.pending if not f.done())

    async def _next_batch(self) -> list[tuple[pa.Table, asyncio.Future]]:
        """1. wait for a request; 2. wait for more until ``wait_s`` after the oldest waiting request arrived (no
        wait when it already waited that long, behind the previous batch) unless ``max_images`` are queued;
        3. take requests in arrival order up to ``max_images`` images, skipping cancelled ones."""
        loop = asyncio.get_running_loop()
        while not self._queued_images():
            self.pending.clear()  # only cancelled ones, if any
            self.arrived.clear()
            await self.arrived.wait()
        deadline = min(t for _, f, t in self.pending if not f.done()) + self.wait_s
        while self._queued_images() < self.max_images and loop.time() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        batch, images = [], 0
        while self.pending:
            items, future, _ = self.pending[0]
            if future.done():  # cancelled while queued
                self.pending.popleft()
                continue
            if batch and images + items.num_rows > self.max_images:
                break
            batch.append(self.pending.popleft())
            images += items.num_rows
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self.run_batch([items for items, _, _ in batch])
            except Exception as err:  # noqa: BLE001 - the batch's callers get the error; the replica goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future, _), result in zip(batch, results):
                if not future.done():  # a caller that went away during the call just gets nothing
                    future.set_result(result)


@serve.deployment(name="sampler")
class SamplerReplica:
    """One model replica: the batch job's :class:`batch.run.stages.Sampler` behind a :class:`Collector`."""

    def __init__(self, spec: JobSpec, device: str, num_threads: int | None):
        from batch.run.stages import Sampler, SamplerSettings
        from batch.store.formats import OutputFormat

        self.spec = spec
        self.sampler = Sampler(SamplerSettings.from_spec(spec, device, num_threads))  # loads the model
        self.fmt = OutputFormat.from_spec(spec)
        self.collector = Collector(self._run_batch, spec.serve.max_batch_size, spec.serve.batch_wait_ms / 1000.0)

    def ready(self) -> bool:
        """Answered only once ``__init__`` (model loading) finished: Serve routes nothing to a replica before."""
        return True

    async def generate(self, items: pa.Table) -> list[dict]:
        """One request's rows (:func:`batch.serve.protocol.split_batch`), sampled with whatever was collected
        with it."""
        return await self.collector.submit(items)

    def _sample(self, batch: pa.Table) -> pa.Table:
        """The sampler call, in a worker thread with the replica's torch thread count (OpenMP's is per thread)."""
        threads = self.sampler.settings.num_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        return self.sampler(batch)

    async def _run_batch(self, requests: list[pa.Table]) -> list[list[dict]]:
        """One collected batch: bucket-sorted GPU batches, one sampler call each (in a worker thread, so the
        replica's event loop keeps collecting and answering), rows back per request."""
        batch = collect_batch(requests, self.spec.batch_size)
        out = await asyncio.to_thread(self._sample, batch)
        return await asyncio.to_thread(split_batch, batch, out, len(requests), self.fmt)


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """HTTP routes, request planning and the queue limit (see the module docstring)."""

    def __init__(self, sampler: Any, spec: JobSpec):
        self.sampler = sampler  # DeploymentHandle of SamplerReplica
        self.spec = spec
        self.queued = 0  # images accepted and not yet answered (this ingress replica; there is one)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 once a sampler replica answers (it has loaded its model), else 503."""
        try:
            await asyncio.wait_for(self.sampler.ready.remote(), READY_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - timeout, no replica yet, replica died: not ready
            return JSONResponse({"status": "not ready", "error": f"{type(err).__name__}: {err}"[:300]},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @api.get("/queue")
    async def queue(self) -> dict:
        """Images accepted and not yet answered, and the limit above which requests get 429."""
        return {"queued_images": self.queued, "max_queued_images": self.spec.serve.max_queued_images}

    @api.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        """Plain form: one JSON object of manifest columns -> ``{"image", "seed", "metadata"}``."""
        return await self._serve(request, "plain")

    @api.post("/score")
    async def score(self, request: Request) -> JSONResponse:
        """Catalogue form: ``{"input_data": {...}}`` -> ``[{"prompt", "generated_image", "nsfw_content_detected"}]``."""
        return await self._serve(request, "catalogue")

    async def _serve(self, request: Request, form: str) -> JSONResponse:
        spec = self.spec
        # 1. read and plan (400, 413)
        body = await request.body()
        try:
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(413, f"request: body of {len(body)} bytes, more than {MAX_BODY_BYTES}")
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"request: not valid JSON ({err})") from None
            table = parse_plain(doc, spec) if form == "plain" else parse_catalogue(doc, spec)
            planned = plan_request(table, spec, form)
        except RequestError as err:
            return _error(err)
        # 2. the queue limit (429)
        n, limit = planned.images, spec.serve.max_queued_images
        if self.queued + n > limit:
            return _error(RequestError(429, f"queue full: {self.queued} images queued, {n} more would exceed "
                                            f"serve.max_queued_images={limit}; retry later"))
        # 3. sample; the count is given back however this ends (answer, error, or the client going away)
        self.queued += n
        try:
            rows = await self.sampler.generate.remote(planned.items)
            return JSONResponse(plain_response(rows) if form == "plain" else catalogue_response(rows))
        except RequestError as err:
            return _error(err)
        finally:
            self.queued -= n


# --- building and running the application ----------------------------------------------------------------------


def load_serve_spec(config: str, overrides: dict[str, Any] | None = None) -> JobSpec:
    """The job spec at ``config`` (a local path or an fsspec URI) with dotted ``overrides``, checked servable."""
    from batch.spec.config import apply_overrides, load_spec, parse_spec

    if "://" in config:
        import fsspec
        import yaml

        from batch.spec.base import SpecError

        try:
            with fsspec.open(config, "r") as fh:
                data = yaml.safe_load(fh.read()) or {}
        except FileNotFoundError:
            raise SpecError(f"job spec not found: {config}") from None
        if not isinstance(data, dict):
            raise SpecError(f"invalid job spec ({config}): expected a mapping at the top level")
        spec = parse_spec(apply_overrides(data, overrides or {}), config)
    else:
        spec = load_spec(config, overrides or {})
    check_servable(spec)
    return spec


def application(spec: JobSpec) -> serve.Application:
    """The bound application for ``spec`` on the Ray this process is attached to (started embedded when none):
    replica resources resolved as the batch job's actors are (:func:`batch.run.pipeline.resolve_resources`,
    ``serve.replicas`` in place of ``actors``; the ingress takes ``writer_cpus``)."""
    import ray

    from batch.run import pipeline
    from batch.spec.config import ActorRange, ReplicaRange

    if not ray.is_initialized():
        pipeline.init_ray(spec)
    s = spec.serve
    replicas = s.replicas
    actors = ActorRange(min=replicas.min, max=replicas.max) if isinstance(replicas, ReplicaRange) else replicas
    local = pipeline.embedded()
    res = pipeline.resolve_resources(spec.model_copy(update={"actors": actors}), pipeline.cluster_resources(),
                                     local=local, cluster_max=None if local else pipeline.cluster_max_resources())
    scale: dict[str, Any] = ({"num_replicas": replicas} if isinstance(replicas, int) else
                             {"autoscaling_config": {"min_replicas": replicas.min, "max_replicas": replicas.max,
                                                     # Serve adds replicas while requests per replica exceed this
                                                     "target_ongoing_requests": s.max_batch_size}})
    sampler = SamplerReplica.options(
        ray_actor_options={"num_cpus": res.cpus_per_actor, "num_gpus": res.gpus_per_actor},
        # a replica holds the batch it samples and the requests queued for the next (the ingress bounds them to
        # max_queued_images), plus room for /ready probes, which must not wait behind a full queue
        max_ongoing_requests=max(s.max_queued_images, s.max_batch_size) + 16,
        **scale,
    ).bind(spec, res.device, res.threads_per_actor if res.device == "cpu" else None)
    return Ingress.options(
        ray_actor_options={"num_cpus": spec.writer_cpus},
        # the ingress answers 429 itself: it must never be the one that queues (probes included)
        max_ongoing_requests=max(1000, 4 * s.max_queued_images),
    ).bind(sampler, spec)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application builder: ``args`` = ``{"config": <spec path or fsspec URI>, "set": {dotted: value}}``
    (what a RayService's ``serveConfigV2`` passes)."""
    unknown = sorted(set(args) - {"config", "set"})
    if unknown or "config" not in args:
        raise ValueError(f"build_app args: expected config (and optional set), got {sorted(args)}")
    return application(load_serve_spec(str(args["config"]), dict(args.get("set") or {})))


def _wait_until_answering(url: str, timeout_s: float) -> None:
    """Poll ``url/health`` until it answers 200 (the proxy is up and routes to the app)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s")
        time.sleep(0.2)


def serve_forever(config: str, overrides: dict[str, Any], host: str | None, port: int | None) -> int:
    """``sdbatch serve``: attach to Ray (``ray_address``/``$RAY_ADDRESS``) or start an embedded one on loopback,
    start Serve's HTTP proxy on ``host:port`` (default: the spec's ``serve.host``/``serve.port``), deploy the
    app, print ``{"event": "ready", "url": ...}`` once it answers, and run until SIGTERM or SIGINT; then shut
    Serve down (and the embedded Ray) and return 0."""
    from batch.run import pipeline

    spec = load_serve_spec(config, overrides)
    host = host or spec.serve.host
    port = port or spec.serve.port
    stop = threading.Event()
    started = pipeline.init_ray(spec)
    try:
        # after ray.init, which installs its own SIGTERM handler in the driver (it exits without Serve's cleanup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(spec), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_until_answering(url, 120)
        print(json.dumps({"event": "ready", "url": f"http://{host}:{port}"}), flush=True)
        while not stop.wait(1.0):  # a timed wait: the signal handler runs between waits at the latest
            pass
        print(json.dumps({"event": "stopping"}), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                pipeline.shutdown()
    print(json.dumps({"event": "stopped"}), flush=True, file=sys.stdout)
    return 0

"""The Ray pipeline: with the serving app (`batch.serve.app`) the only modules that import Ray.

    planned items (driver) -> blocks -> [sampler actor pool] -> [encode + write tasks] -> driver

1. The driver's plan (validated, seeded, bucket-sorted items) is cut into blocks of whole GPU batches
   (:func:`batch.plan.batches.cut_blocks`), so a one-file manifest still spreads over every actor and batch
   composition is deterministic.
2. GPU stage: an elastic ``ActorPoolStrategy(min_size, max_size)`` (:func:`resolve_resources`) of
   :class:`batch.run.stages.Sampler`, each actor one model replica of the spec's task with ``num_gpus=gpus_per_actor``; it returns raw pixels, never encodes
   or uploads. Blocks travel as whole GPU batches packed one per row (:func:`batch.plan.batches.pack_batches`)
   and the sampler is called with ``batch_size=1``: Ray Data requires an integer batch size whenever GPUs
   are requested, and merges or slices blocks to honour it, which must never split a GPU batch.
   Tasks with input images (variation, upscale) first fetch them in a CPU stage
   (:func:`batch.run.inputs.fetch_inputs`).
3. CPU stage: a small autoscaling pool of :class:`batch.run.stages.EncodeWriter` (warm processes running
   :func:`batch.run.stages.encode_and_write`) encodes images and writes objects via fsspec; as Ray tasks, each
   block paid a fresh worker's start-up and imports (``BENCHMARKS.md``).
4. The driver streams finished blocks back (``iter_batches``) and commits metadata as they arrive.

Resources: actor CPUs are chosen so that at least ``writer_cpus`` stay free for the CPU stage; a pool
that would take every CPU (the 2-CPU deadlock where encode tasks never schedule) is refused up front.
Ray is embedded locally (``ray.init()``, no dashboard, token auth off as nothing listens beyond
loopback) unless ``ray_address``/``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from batch.plan.batches import cut_blocks, pack_batches
from batch.plan.locations import input_rules
from batch.run import reaper
from batch.spec.base import SpecError
from batch.spec.config import JobSpec
from batch.tasks import TASKS


@dataclass(frozen=True)
class Resources:
    """Resolved compute settings (what ``auto`` became on this cluster).

    The sampler pool is elastic: ``min_actors`` start (work waits for them), and Ray Data adds actors up to
    ``actors`` (the maximum) while work queues and the cluster has room; ``max_source`` says where that maximum
    came from: ``spec`` (a number, or ``{min, max}`` with ``max``), ``cluster max`` (the autoscaler's cluster
    config: what the cluster can grow to) or ``current`` (the resources present now; no autoscaler config).
    """

    device: str
    actors: int  # the pool's maximum size (blocks are cut for this many actors)
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int
    cluster_cpus: float
    cluster_gpus: float
    min_actors: int = 0  # 0: same as ``actors`` (a fixed pool)
    max_source: str = "spec"

    @property
    def pool_min(self) -> int:
        """The pool's minimum size."""
        return min(self.min_actors or self.actors, self.actors)


def is_local(spec: JobSpec) -> bool:
    """True when no cluster address is given: Ray runs embedded on this machine."""
    return not (spec.ray_address or os.environ.get("RAY_ADDRESS"))


def init_ray(spec: JobSpec) -> bool:
    """Connect to a cluster or start an embedded local Ray; return True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if not is_local(spec):
        ray.init(address=spec.ray_address or os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        global _REAPER
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only embedded instance
        # a private temp dir (short: Ray's socket paths must fit 107 bytes) names this driver's Ray processes,
        # so the watchdog (batch.run.reaper) can end exactly those if the driver dies without cleaning up
        temp_dir = tempfile.mkdtemp(prefix="sdbatch-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        _REAPER = reaper.start(os.getpid(), temp_dir)
        # address="local": always a fresh embedded instance, never a cluster that `ray start` left running
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", _temp_dir=temp_dir)
    return True


_REAPER = None  # the watchdog of the embedded Ray this process started (batch.run.reaper), if any


def embedded() -> bool:
    """True while this process runs the embedded local Ray it started (:func:`init_ray`), which cannot grow."""
    return _REAPER is not None


@contextlib.contextmanager
def ray_attached(spec: JobSpec) -> Iterator[None]:
    """The one way the job and the evaluation use Ray: attach to the cluster or start an embedded Ray
    (unless Ray is already initialised), and stop it afterwards only if this call started it."""
    started = init_ray(spec)
    try:
        yield
    finally:
        if started:
            shutdown()


@contextlib.contextmanager
def ray_session(spec: JobSpec, needed: bool = True) -> Iterator[Resources | None]:
    """:func:`ray_attached`, yielding the spec's compute settings resolved on that cluster. ``needed=False``
    yields None and touches no Ray."""
    if not needed:
        yield None
        return
    with ray_attached(spec):
        local = is_local(spec)
        yield resolve_resources(spec, cluster_resources(), local=local,
                                cluster_max=None if local else cluster_max_resources())


def resolve_resources(spec: JobSpec, cluster: dict[str, float], local: bool,
                      cluster_max: dict[str, float] | None = None) -> Resources:
    """Turn the spec's ``auto`` compute settings into numbers for this cluster (pure).

    ``cluster``: the resources present now (``ray.cluster_resources()``); ``cluster_max``: what the cluster can
    grow to (:func:`cluster_max_resources`; None when unknown). ``actors: auto`` on cuda is an elastic pool
    from one actor per GPU present to one per GPU of the cluster's maximum (the present GPUs when the maximum is
    unknown); ``{min, max}`` without ``max`` grows the same way. A local Ray cannot grow: its pool is checked
    against the CPUs and GPUs present.
    """
    from batch.spec.config import ActorRange

    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    max_gpus = float((cluster_max or {}).get("GPU", 0) or 0) if not local else 0.0
    # auto: cuda when the cluster has GPUs now or can add them (GPU workers that autoscale from zero)
    device = spec.device if spec.device != "auto" else ("cuda" if gpus > 0 or max_gpus > 0 else "cpu")
    # a CPU run requests no GPUs (device: auto resolving to cpu ignores the spec's gpus_per_actor; an explicit
    # device: cpu with GPUs is refused by the spec)
    gpa = (spec.gpus_per_actor if spec.gpus_per_actor is not None else 1.0) if device == "cuda" else 0.0
    fits_now = max(1, int(gpus // gpa)) if device == "cuda" and gpa > 0 else 1
    fits_max = max(fits_now, int(max_gpus // gpa)) if device == "cuda" and gpa > 0 else fits_now
    grown = "cluster max" if device == "cuda" and gpa > 0 and max_gpus > 0 else "current"
    if spec.actors == "auto":
        lo, hi, source = fits_now, fits_max, grown
    elif isinstance(spec.actors, ActorRange):
        lo = spec.actors.min
        hi, source = (spec.actors.max, "spec") if spec.actors.max is not None else (max(lo, fits_max), grown)
    else:
        lo = hi = spec.actors
        source = "spec"
    if spec.cpus_per_actor is not None:
        cpa = spec.cpus_per_actor
    elif device == "cuda":
        cpa = 1.0
    else:  # CPU sampling: give the starting actors every CPU but what the encode/write stage needs
        cpa = max(0.1, (cpus - max(spec.writer_cpus, 0.5)) / lo)
    held = hi if local else lo  # a local pool may reach its maximum on these very CPUs
    need = held * cpa + spec.writer_cpus
    if local and need > cpus + 1e-9:
        raise SpecError(
            f"cpus_per_actor={cpa:g} x actors={held} + writer_cpus={spec.writer_cpus:g} = {need:g} CPUs, but "
            f"Ray has {cpus:g}: the actors would hold every CPU and the encode/write stage would never run. "
            "Lower actors or cpus_per_actor (fractions are fine)."
        )
    if device == "cuda" and local and gpus < held * gpa:
        raise SpecError(f"actors={held} x gpus_per_actor={gpa:g} needs {held * gpa:g} GPUs; Ray has {gpus:g}")
    return Resources(device=device, actors=hi, gpus_per_actor=gpa, cpus_per_actor=cpa,
                     threads_per_actor=max(1, round(cpa)), cluster_cpus=cpus, cluster_gpus=gpus,
                     min_actors=lo, max_source=source)


def _quiet_data_context():
    """Ray Data's context with its own logs and progress bars quieted: the driver shows one bar instead."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we show ours
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    return ctx


def _on_ray_node(stage: type) -> type:
    """``stage`` (a class with a ``worker`` identity) recording the Ray node its actor runs on in ``worker``
    (:func:`batch.models.devices.worker_id`), so rows say which node made them, also when nodes share a host."""

    class OnRayNode(stage):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            import ray

            from batch.models.devices import worker_id

            super().__init__(*args, **kwargs)
            self.worker = worker_id(ray.get_runtime_context().get_node_id())

    OnRayNode.__name__ = OnRayNode.__qualname__ = stage.__name__  # Ray Data names the operator after it
    return OnRayNode


def _pool(res: Resources, blocks: int):
    """The sampler (or feature) pool: ``ActorPoolStrategy(min_size, max_size)`` from the resolved sizes, never
    more actors than blocks. Ray Data starts ``min_size`` actors and requests one more while every running actor
    has 2 blocks in flight and blocks still queue (utilisation >= 1.75: ``DefaultActorAutoscaler``); without
    room the new actor stays pending (a resource request an autoscaler answers) and starts on a node that joins
    (tests/test_cluster.py); idle actors are retired."""
    from ray.data import ActorPoolStrategy

    hi = max(1, min(res.actors, blocks))
    return ActorPoolStrategy(min_size=min(res.pool_min, hi), max_size=hi)


def run_items(items: pa.Table, spec: JobSpec, res: Resources, upload: bool) -> Iterator[pa.Table]:
    """Generate and write every item; yield result tables (metadata rows) as blocks finish."""
    import ray

    from batch.run.inputs import fetch_packed_inputs
    from batch.run.stages import EncodeWriter, Sampler, SamplerSettings, WriterSettings

    blocks = cut_blocks(items, spec.batch_size, res.actors)
    if not blocks:
        return
    ctx = _quiet_data_context()
    # every sampler actor is up before blocks are handed out: otherwise the first one to load its model
    # takes the queued blocks and the others idle (a timeout here means the cluster cannot host the pool)
    ctx.wait_for_min_actors_s = spec.wait_for_actors_s or -1
    # Ray Data's default resource allocator reserves each operator a share of the cluster (half of it split
    # over the operators); an actor pool then grows only within its share, so a sampler pool never grew onto a
    # node that joined mid-run (tests/test_cluster.py). Without it the pool grows to max_size while blocks
    # queue, a new actor waiting for room (which is what makes an autoscaler add nodes); pool sizes are bounded
    # by resolve_resources instead. A fixed pool (every local run) keeps Ray Data's default.
    # (set either way: the context outlives this job in the driver process)
    ctx.op_resource_reservation_enabled = res.pool_min >= res.actors

    # whole GPU batches, one per Ray row: Ray's integer batch_size (required with GPUs) can then never
    # split a GPU batch across sampler calls, whatever it merges or slices (batch.plan.batches)
    packed = [pack_batches(b) for b in blocks]
    fetch_kwargs = None
    if TASKS[spec.task].input_image:  # fetch input images in a CPU stage first, never inside the actors
        fetch_kwargs = dict(storage_options=spec.storage_options, max_pixels=spec.limits.max_input_pixels,
                            allowed=input_rules(spec)[0], max_bytes=spec.limits.max_input_bytes,
                            timeout_s=spec.limits.input_read_timeout_s)
        if any(str(u).startswith("memory://") for u in items.column("image_uri").to_pylist()):
            # memory:// exists only in this process: fetch here (still before, and outside, the actors)
            packed, fetch_kwargs = [fetch_packed_inputs(p, **fetch_kwargs) for p in packed], None
    ds = ray.data.from_arrow(packed)
    if fetch_kwargs is not None:
        ds = ds.map_batches(fetch_packed_inputs, fn_kwargs=fetch_kwargs, batch_size=None, batch_format="pyarrow",
                            num_cpus=spec.writer_cpus)
    threads = res.threads_per_actor if res.device == "cpu" else None
    ds = ds.map_batches(
        _on_ray_node(Sampler),
        fn_constructor_args=(SamplerSettings.from_spec(spec, res.device, threads),),
        batch_size=1,  # one packed row = one whole GPU batch per sampler call (Ray requires an int with GPUs)
        batch_format="pyarrow",
        compute=_pool(res, len(blocks)),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        # A crashed actor (OOM kill, lost node) is restarted and its in-flight blocks resubmitted: Ray Data's
        # actor pools default to max_restarts=-1, max_task_retries=-1 (tests/test_resume.py kills one).
    )
    ds = ds.map_batches(
        EncodeWriter,
        fn_constructor_args=(WriterSettings.from_spec(spec, upload),),
        # images_per_shard: Ray Data bundles rows across blocks into calls of at most that many images, so a
        # shard can hold more than one sampler block; None: one call (and shard) per block
        batch_size=spec.images_per_shard if spec.output_format != "files" else None,
        batch_format="pyarrow",
        # warm writer processes, one to start with, more while blocks queue up (PNG encoding of many GPUs)
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, 2 * res.actors)),
        num_cpus=spec.writer_cpus,
    )
    # prefetch_batches=0: each block reaches the driver (and its commit) as soon as it is written. With Ray's
    # default (1), iter_batches(batch_size=None) asks for the next block before it yields the current one
    # (ray/data/_internal/block_batching/iter_batches.py, prefetch_batches_locally), so every commit waited
    # for the following block, and the last committed rows lagged one block behind what was written.
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


def cluster_resources() -> dict[str, Any]:
    """The resources the cluster has now (``ray.cluster_resources()``)."""
    import ray

    return dict(ray.cluster_resources())


def cluster_max_resources() -> dict[str, Any] | None:
    """What the cluster can grow to, or None when nobody says.

    Ray 2.60 keeps the autoscaler's cluster config (node groups with ``max_count``, e.g. a KubeRay worker
    group's ``maxReplicas``) in the GCS; ``ray._private.state.state.get_max_resources_from_cluster_config()``
    sums it (Ray Data's own shuffle sizing and Ray Train's worker-group check read the same value). It is a
    private API: any error, or a cluster without that config (no autoscaler, or the v1 autoscaler), gives
    None, and the pool's maximum falls back to the resources present now (``Resources.max_source``).
    """
    try:
        import ray._private.state as ray_state

        found = ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - private API: absent or changed means "unknown", not a failed job
        logging.getLogger(__name__).debug("no cluster max resources", exc_info=True)
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def shutdown(timeout_s: float = 60.0) -> None:
    """Stop Ray (this process's connection, and the embedded instance if it started one), waiting at most
    ``timeout_s`` (a full disk or a lost cluster must not keep the driver alive); then the watchdog of the
    embedded instance ends anything Ray left running and removes its temp dir."""
    import threading

    import ray

    global _REAPER
    stopper = threading.Thread(target=ray.shutdown, name="sdbatch-ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        logging.getLogger(__name__).warning("ray.shutdown() did not finish in %.0fs; leaving it to the watchdog",
                                            timeout_s)
    if _REAPER is not None:
        reaper_proc, _REAPER = _REAPER, None
        reaper_proc.stdin.close()  # EOF: the watchdog cleans up now
        try:
            reaper_proc.wait(timeout=15)
        except Exception:
            pass


def run_features(table: pa.Table, extractor_kwargs: dict[str, Any], res: Resources,
                 rows_per_block: int) -> Iterator[pa.Table]:
    """Feature extraction for the evaluation: ``table`` rows (``uri``, optional ``prompt``) ->
    an ``ActorPoolStrategy`` sized as the job's (:func:`_pool`) of :class:`batch.metrics.extract.FeatureExtractor` (one Inception
    and/or CLIP replica per actor, ``num_gpus=res.gpus_per_actor``) -> result blocks streamed to the driver,
    which only reduces them to statistics."""
    import ray

    from batch.metrics.extract import FeatureExtractor

    if table.num_rows == 0:
        return
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    _quiet_data_context()
    kwargs = dict(extractor_kwargs, device=res.device,
                  num_threads=res.threads_per_actor if res.device == "cpu" else None)
    ds = ray.data.from_arrow(blocks).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=kwargs,
        batch_size=rows_per_block,  # an int: Ray refuses None with num_gpus; images are scored independently
        batch_format="pyarrow",
        compute=_pool(res, len(blocks)),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)  # as run_items

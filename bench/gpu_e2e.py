"""GPU end to end (issue 18): every measurement in one budgeted run that writes ``RESULT key=value ...`` lines.

The driver (no torch) runs each part in its own process, in priority order, and skips a part (a
``RESULT part=... status=skipped`` line) when the time left is below that part's estimate, so one run of at
most 9 minutes always ends with a complete results file; ``--parts`` reruns the rest. Parts:

* ``build``: full-size SD1.x with random weights from the published configs (``bench/common.py``: SD v1-4
  UNet/VAE, CLIP ViT-L text encoder) saved as a diffusers folder in fp16, a random FID Inception and a
  full-size random CLIP ViT-L/14 (no downloads). ``--smoke``: the tiny presets.
* ``e2e_<mode>_b<N>``: ``sdbatch run`` (Ray, one actor, local output, PNG files) at 512x512, 50 steps, CFG
  7.5, PNDM, fp16, batch N, eager or compiled (``torch.compile`` of the UNet). images/s is the job's own
  steady state (:func:`batch.run.stats.steady_rate` of the metadata's ``sampled_at``: images after the first
  batch over the time from its end to the last batch's end), and % of the dense fp16 peak takes 82.9 TFLOP
  per image (issue 6) over the GPU's dense fp16 tensor peak (H100 SXM / H200: 989.4 TFLOP/s, NVIDIA's
  datasheets list 1,979 TFLOP/s "with sparsity", half of it dense). The compiled b32 job runs first with a
  fresh inductor cache folder and ``optimizations.compile_cache``, so its first batch is the first actor's
  warm-up (compile included) and it saves the torch.compiler artifacts.
* ``raw_<mode>_b<N>``: the raw sampler loop (``batch.sampling.txt2img.txt2img`` on the same model, batch and
  switches, no Ray, no encoding, no I/O), steady batches after one warm-up; then ``ratio`` = job / raw.
* ``warm_later``: a second ``sdbatch run`` with a fresh inductor cache folder (as another node, or the next
  night) loading the saved artifacts: the later actor's warm-up.
* ``profile_b32``: PyTorch profiler over denoising steps of the eager UNet at batch 32: device time by kind
  of operator (attention, convolution, matmul, GroupNorm, elementwise/other) plus the scheduler step and
  the CFG combine (``record_function`` ranges).
* ``features``: the feature stage (:class:`batch.metrics.extract.FeatureExtractor`, FID Inception + CLIP
  ViT-L/14 at full size, random weights) over >= 2,000 rows that read the e2e job's PNGs: images/s; with
  torchvision present, the max feature difference to torchvision's ``inception_v3`` with pytorch-fid's
  block replacements loaded with the same state dict.
* ``switch_<name>``: the raw compiled b32 loop with one more switch on (``reduce_overhead`` = CUDA graphs,
  ``compile_vae``, ``pinned_memory``, ``channels_last``, ``fuse_qkv``), against ``raw_compiled_b32``.

    python bench/gpu_e2e.py [--smoke] [--out DIR] [--budget-s 510] [--parts build,e2e_compiled_b32,...]

``bench/gpu_e2e.sh`` installs the wheel bundle and calls this on the GPU machine. Results go to
``<out>/results.txt`` (and stdout); each part's log to ``<out>/logs/<part>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SD1_TFLOP_PER_IMAGE = 82.9  # SD1.x, 512x512, 50 steps, CFG (issue 6)
SWITCHES = ("reduce_overhead", "compile_vae", "pinned_memory", "channels_last", "fuse_qkv")


# --- RESULT lines ---------------------------------------------------------------------------------------

def result_line(part: str, **fields) -> str:
    """``RESULT part=<part> key=value ...``: floats rounded to 4 significant places, spaces in values -> _."""
    items = [("part", part)] + list(fields.items())
    out = []
    for k, v in items:
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, bool):
            v = int(v)
        out.append(f"{k}={str(v).replace(' ', '_').replace('=', ':')}")
    return "RESULT " + " ".join(out)


def parse_results(text: str) -> list[dict[str, str]]:
    """The ``RESULT`` lines of ``text`` as dicts (values are strings)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            rows.append(dict(kv.split("=", 1) for kv in line[len("RESULT "):].split()))
    return rows


def emit(part: str, **fields) -> None:
    print(result_line(part, **fields), flush=True)


# --- configuration ----------------------------------------------------------------------------------------

def config(smoke: bool) -> dict:
    if smoke:
        return dict(smoke=True, device="cpu", dtype="float32", size=64, steps=4, batches=[2], jobs_batches=3,
                    feature_rows=48, feature_batch=16, profile_steps=2)
    return dict(smoke=False, device="cuda", dtype="float16", size=512, steps=50, batches=[32, 16],
                jobs_batches=6, feature_rows=2048, feature_batch=64, profile_steps=3)


def plan(cfg: dict) -> list[tuple[str, float]]:
    """(part, estimated seconds on an H100/H200) in priority order."""
    b = cfg["batches"]
    parts = [("build", 70), (f"e2e_compiled_b{b[0]}", 150), (f"raw_compiled_b{b[0]}", 80), ("warm_later", 80),
             ("profile_b%d" % b[0], 50), ("features", 80), (f"e2e_eager_b{b[0]}", 80), (f"raw_eager_b{b[0]}", 50)]
    for n in b[1:]:
        parts += [(f"e2e_compiled_b{n}", 130), (f"raw_compiled_b{n}", 70), (f"e2e_eager_b{n}", 70),
                  (f"raw_eager_b{n}", 45)]
    parts += [(f"switch_{s}", 100) for s in SWITCHES]
    if cfg["smoke"]:  # one job per code path (eager and "compiled" are the same there), one refused switch
        keep = {"build", f"e2e_compiled_b{b[0]}", f"raw_compiled_b{b[0]}", "warm_later", f"profile_b{b[0]}",
                "features", "switch_pinned_memory"}
        return [(p, 1.0) for p, _ in parts if p in keep]
    return parts


# --- workers (run in their own process: ``--worker PART``) -------------------------------------------------

def _peak(device_name: str | None) -> float | None:
    from gpu_throughput import DENSE_FP16_TFLOPS

    if not device_name:
        return None
    return next((v for k, v in DENSE_FP16_TFLOPS.items() if k in device_name), None)


def worker_build(cfg: dict, work: Path) -> None:
    import torch

    t0 = time.perf_counter()
    if cfg["smoke"]:
        from batch.models.load import save_tiny_model
        from batch.metrics.tiny import save_tiny_clip

        save_tiny_model(work / "model")
        save_tiny_clip(work / "clip")
    else:
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

        from batch.models.tiny import tiny_components
        from common import CLIP_L, SD1_UNET, SD_VAE

        torch.manual_seed(0)
        comps = tiny_components("epsilon")
        with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on the host
            comps["unet"] = UNet2DConditionModel(**SD1_UNET)
            comps["vae"] = AutoencoderKL(**SD_VAE)
            tok = comps["tokenizer"]
            comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**dict(
                CLIP_L, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).to(torch.float16)
        pipe.save_pretrained(work / "model", safe_serialization=True)
        # CLIP ViT-L/14 (openai/clip-vit-large-patch14's config) with random weights
        text = dict(CLIP_L, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="quick_gelu")
        with torch.device("cuda"):
            clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
        clip.save_pretrained(work / "clip", safe_serialization=True)
        tok.save_pretrained(work / "clip")
        from batch.metrics.clip import clip_image_processor_class

        clip_image_processor_class()(size={"shortest_edge": 224},
                                     crop_size={"height": 224, "width": 224}).save_pretrained(work / "clip")
    from batch.metrics.tiny import save_random_inception

    save_random_inception(work / "inception.pth")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    emit("build", seconds=time.perf_counter() - t0, gpu=name or "none", peak_tflops=_peak(name) or 0,
         torch=torch.__version__, cuda=torch.version.cuda or "none")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _opts(mode: str, switch: str | None = None):
    from batch.spec.base import Optimizations

    compiled = mode == "compiled"
    kw = dict(compile=compiled)
    if switch == "reduce_overhead":
        kw["compile_mode"] = "reduce-overhead"
    elif switch:
        kw[switch] = True
    return Optimizations(**kw)


def worker_raw(cfg: dict, work: Path, part: str, mode: str, batch: int, switch: str | None = None) -> None:
    """The raw sampler loop: one warm-up batch (compile included), then timed batches."""
    import torch

    from batch.models.load import load_model, make_scheduler
    from batch.models.speed import apply_optimizations
    from batch.sampling.txt2img import SamplingParams, txt2img

    if cfg["smoke"]:
        mode = "eager"  # inductor on 2 CPU cores takes minutes; the smoke run checks the code paths only
        torch.set_num_threads(1)  # as a CPU actor (Ray sets OMP_NUM_THREADS=1); spinning threads on a busy host
    model = load_model(str(work / "model"), dtype=cfg["dtype"], device=cfg["device"])
    try:
        done = apply_optimizations(model, _opts(mode, switch))
    except ValueError as err:  # a CUDA-only switch on CPU
        emit(part, status="refused", reason=str(err)[:120])
        return
    params = SamplingParams(height=cfg["size"], width=cfg["size"], num_inference_steps=cfg["steps"],
                            guidance_scale=7.5)
    prompts = [f"a photograph of an astronaut riding a horse, {i}" for i in range(batch)]
    timed = 2 if cfg["smoke"] else 3
    times = []
    for k in range(1 + timed):
        _sync()
        t0 = time.perf_counter()
        txt2img(model, make_scheduler("pndm", model.scheduler_config), prompts, [None] * batch,
                list(range(k * batch, (k + 1) * batch)), params, nan_fallback=True, pinned=model.device.type == "cuda" and switch == "pinned_memory")
        _sync()
        times.append(time.perf_counter() - t0)
    ips = batch * timed / sum(times[1:])
    peak = _peak(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    emit(part, mode=mode, batch=batch, images_per_s=ips, s_per_step=sum(times[1:]) / timed / cfg["steps"],
         warmup_s=times[0] - statistics.median(times[1:]), pct_peak=100 * ips * SD1_TFLOP_PER_IMAGE / peak if peak and not cfg["smoke"] else "na",
         switch=switch or "none", applied=",".join(sorted(done)))


def worker_profile(cfg: dict, work: Path, part: str, batch: int) -> None:
    """Per-step device time by operator kind, eager UNet (fused compiled kernels lose the op names)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from batch.models.load import load_model, make_scheduler
    from batch.sampling.txt2img import encode_text, initial_latents

    model = load_model(str(work / "model"), dtype=cfg["dtype"], device=cfg["device"])
    dev = model.device
    prompts = [f"a photo {i}" for i in range(batch)]
    cond = encode_text(model.tokenizer, model.text_encoder, prompts, dev)
    uncond = encode_text(model.tokenizer, model.text_encoder, [""] * batch, dev)
    embeds = torch.cat([uncond, cond])
    f = model.vae_scale_factor
    latents, _ = initial_latents(list(range(batch)), (4, cfg["size"] // f, cfg["size"] // f), dev, cond.dtype)
    sched = make_scheduler("pndm", model.scheduler_config)
    sched.set_timesteps(cfg["steps"], device=dev)
    steps = list(sched.timesteps)

    def step(t):
        nonlocal latents
        with record_function("unet"):
            eps = model.unet(sched.scale_model_input(torch.cat([latents] * 2), t), t, encoder_hidden_states=embeds,
                             return_dict=False)[0]
        with record_function("cfg_combine"):
            eps_u, eps_t = eps.chunk(2)
            eps = eps_u + 7.5 * (eps_t - eps_u)
        with record_function("scheduler"):
            latents = sched.step(eps, t, latents, return_dict=False)[0]

    with torch.no_grad():
        for t in steps[:2]:  # warm-up (cuDNN/cuBLAS handles, PNDM's first steps)
            step(t)
        _sync()
        cuda = dev.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        n = cfg["profile_steps"]
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for t in steps[2:2 + n]:
                step(t)
            _sync()
        wall = (time.perf_counter() - t0) / n
    kinds = Counter()
    ranges = Counter()
    for ev in prof.events():
        if ev.device_type != DeviceType.CPU:  # operators and ranges (their kernels are counted through them)
            continue
        own = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1000.0  # us -> ms
        if ev.name in ("unet", "cfg_combine", "scheduler"):
            ranges[ev.name] += (ev.device_time_total if cuda else ev.cpu_time_total) / 1000.0
            continue
        if not ev.name.startswith("aten::") or own <= 0:
            continue
        name = ev.name
        if "attention" in name or "flash" in name or "efficient" in name or "softmax" in name:
            kinds["attention"] += own
        elif "conv" in name:
            kinds["convolution"] += own
        elif "group_norm" in name or "layer_norm" in name:
            kinds["norm"] += own
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
            kinds["matmul"] += own
        else:
            kinds["elementwise_other"] += own
    total = sum(kinds.values()) or 1.0
    emit(part, batch=batch, steps=n, wall_ms_per_step=1000 * wall, device_ms_per_step=total / n,
         **{f"{k}_pct": 100 * kinds[k] / total for k in ("attention", "convolution", "matmul", "norm", "elementwise_other")},
         scheduler_ms_per_step=ranges["scheduler"] / n, cfg_combine_ms_per_step=ranges["cfg_combine"] / n,
         unet_ms_per_step=ranges["unet"] / n, timer="device" if cuda else "cpu")


def _torchvision_fid_inception(state: dict):
    """torchvision's inception_v3 with pytorch-fid's block replacements (pytorch_fid/inception.py,
    ``fid_inception_v3``: TF's average pool without the padded zeros; E_2 with a max pool), for comparison."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.models import inception as tvi

    def pool(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class A(tvi.InceptionA):
        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool(x))], 1)

    class C(tvi.InceptionC):
        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pool(x))], 1)

    class E(tvi.InceptionE):
        max_pool = False

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            p = F.max_pool2d(x, 3, 1, 1) if self.max_pool else pool(x)
            return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)

    class E2(E):
        max_pool = True

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, pool_features=32), A(256, pool_features=64), A(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = C(768, channels_7x7=128), C(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = C(768, channels_7x7=160), C(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = E(1280), E2(2048)
    net.load_state_dict(state)
    net.eval()

    def features(x):  # pytorch-fid's InceptionV3 blocks up to the 2048-d pool (input already in [-1, 1])
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(net, name)(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(net, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)

    return net, features


def worker_features(cfg: dict, work: Path, part: str) -> None:
    import numpy as np
    import pyarrow as pa
    import torch

    from batch.metrics.extract import FeatureExtractor

    pngs = sorted(str(p) for p in (work / "out_e2e").rglob("*.png"))
    if not pngs:
        emit(part, status="skipped", reason="no_e2e_images")
        return
    n = cfg["feature_rows"]
    uris = [pngs[i % len(pngs)] for i in range(n)]
    table = pa.table({"uri": uris, "prompt": [f"a photograph number {i}" for i in range(n)]})
    ext = FeatureExtractor(str(work / "inception.pth"), str(work / "clip"), device=cfg["device"],
                           batch_size=cfg["feature_batch"])
    block = max(cfg["feature_batch"] * 4, 16)
    ext(table.slice(0, block))  # warm-up
    _sync()
    t0 = time.perf_counter()
    done = 0
    for start in range(0, n, block):
        out = ext(table.slice(start, block))
        done += out.num_rows
        assert out.column("feature_error").null_count == out.num_rows, out.column("feature_error")
    _sync()
    ips = done / (time.perf_counter() - t0)
    fields = dict(images=done, images_per_s=ips, unique_files=len(pngs))
    try:
        from batch.metrics.fid import to_inception_input

        state = torch.load(str(work / "inception.pth"), map_location="cpu", weights_only=True)
        _, tv_features = _torchvision_fid_inception(state)
        rng = np.random.default_rng(0)
        imgs = rng.integers(0, 256, (8, 512, 512, 3), dtype=np.uint8)
        x = to_inception_input(imgs, "cpu").float()
        ours = ext.inception.float().cpu()(x)
        with torch.no_grad():
            theirs = tv_features(x)
        fields.update(tv_max_abs_diff=float((ours - theirs).abs().max()),
                      tv_feature_max_abs=float(ours.abs().max()))
    except Exception as err:  # torchvision is missing or unusable (the CPU machine)
        fields.update(tv_max_abs_diff="na", tv_reason=f"{type(err).__name__}:{err}"[:80])
    emit(part, **fields)


# --- the driver -------------------------------------------------------------------------------------------

def write_manifest(path: Path, n: int, offset: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{offset + i:05d}", "prompt": f"a photograph of an astronaut riding a horse, {i}",
             "seed": offset + i} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def job_spec(cfg: dict, work: Path, out: Path, manifest: Path, batch: int, mode: str, cache: str | None) -> dict:
    compiled = mode == "compiled" and not cfg["smoke"]
    opts = {"compile": compiled}
    if compiled and cache:
        opts["compile_cache"] = cache
    return {"model": str(work / "model"), "device": cfg["device"], "dtype": cfg["dtype"], "manifest": str(manifest),
            "output": str(out), "actors": 1, "batch_size": batch, "progress": False, "commit_every": 256,
            "defaults": {"height": cfg["size"], "width": cfg["size"], "num_inference_steps": cfg["steps"],
                         "guidance_scale": 7.5, "scheduler": "pndm"},
            "optimizations": opts}


def job_figures(out: Path) -> dict:
    """Steady images/s, first-batch warm-up and the cache the actor loaded, from a job's metadata."""
    from batch.run.stats import steady_rate
    from batch.store.commit import read_metadata

    meta = read_metadata(str(out)).to_pylist()
    ok = [r for r in meta if r["status"] == "ok"]
    ends = Counter(r["sampled_at"] for r in ok)
    per_batch = {}
    for r in ok:
        per_batch[r["sampled_at"]] = r["t_sample_s"] * ends[r["sampled_at"]]
    times = [per_batch[k] for k in sorted(per_batch)]
    opt = json.loads(ok[0]["optimizations"]) if ok else {}
    steady = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    return dict(images_ok=len(ok), images_failed=len(meta) - len(ok), images_per_s=steady_rate(ends),
                batches=len(times), first_batch_s=times[0] if times else float("nan"), steady_batch_s=steady,
                warmup_s=times[0] - steady if len(times) > 1 else float("nan"),
                cache_loaded_bytes=opt.get("compile_cache", {}).get("loaded_bytes", 0))


class Driver:
    """Runs the parts in order within the budget and collects their RESULT lines."""

    def __init__(self, args, cfg: dict):
        self.args, self.cfg = args, cfg
        self.out = Path(args.out)
        self.work = Path(args.work)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.txt"
        self.deadline = time.monotonic() + args.budget_s
        self.rows: dict[str, dict] = {}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, line: str) -> None:
        print(line, flush=True)
        with open(self.results, "a") as f:
            f.write(line + "\n")
        for row in parse_results(line):
            self.rows[row["part"]] = row

    def run(self, part: str, argv: list[str], env: dict | None = None) -> tuple[int, str]:
        """Run one process for ``part`` with the time left (minus a margin) as its limit."""
        limit = max(5.0, self.left() - 5)
        log = self.out / "logs" / f"{part}.log"
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(argv, env=env or self.env, stdout=subprocess.PIPE, stderr=f, text=True,
                                      timeout=limit, cwd=ROOT)
                rc, text = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as err:
                rc, text = 124, (err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or "")
            f.write("\n--- stdout ---\n" + text)
        for row in parse_results(text):
            self.record(result_line(**row))
        if rc != 0:
            self.record(result_line(part, status="timeout" if rc == 124 else "failed", rc=rc,
                                    seconds=time.monotonic() - t0, log=f"logs/{part}.log"))
        return rc, text

    def worker(self, part: str, *extra: str, env: dict | None = None) -> int:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--work", str(self.work),
                "--out", str(self.out)] + (["--smoke"] if self.cfg["smoke"] else []) + list(extra)
        return self.run(part, argv, env)[0]

    def inductor_env(self, name: str) -> dict:
        """A fresh (per name) inductor/Triton cache folder, as on another node."""
        d = self.work / f"inductor-{name}"
        return dict(self.env, TORCHINDUCTOR_CACHE_DIR=str(d), TRITON_CACHE_DIR=str(d / "triton"))

    def job(self, part: str, mode: str, batch: int, cache_env: str, batches: int, out_name: str) -> None:
        cfg = self.cfg
        manifest = self.work / f"{part}.parquet"
        write_manifest(manifest, batch * batches)
        out = self.work / out_name
        if out.exists():  # a rerun in the same folder starts afresh (not a resume)
            import shutil

            shutil.rmtree(out)
        spec = job_spec(cfg, self.work, out, manifest, batch, mode, str(self.work / "compile-cache"))
        spec_path = self.work / f"{part}.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.monotonic()
        rc, _ = self.run(part, [sys.executable, "-m", "batch.cli", "run", str(spec_path), "--quiet"],
                         env=self.inductor_env(cache_env))
        wall = time.monotonic() - t0
        if rc != 0:
            return
        fig = job_figures(out)
        peak = float(self.rows.get("build", {}).get("peak_tflops", 0) or 0)
        pct = 100 * fig["images_per_s"] * SD1_TFLOP_PER_IMAGE / peak if peak and not cfg["smoke"] else "na"
        self.record(result_line(part, mode=mode, batch=batch, compiled=int(mode == "compiled" and not cfg["smoke"]),
                                job_wall_s=wall, pct_peak=pct, **fig))

    def ratio(self, mode: str, batch: int) -> None:
        job, raw = self.rows.get(f"e2e_{mode}_b{batch}", {}), self.rows.get(f"raw_{mode}_b{batch}", {})
        if "images_per_s" in job and "images_per_s" in raw:
            r = float(job["images_per_s"]) / float(raw["images_per_s"])
            self.record(result_line(f"ratio_{mode}_b{batch}", mode=mode, batch=batch, ratio=r,
                                    job_images_per_s=job["images_per_s"], raw_images_per_s=raw["images_per_s"]))

    def do(self, part: str) -> None:
        cfg = self.cfg
        b0 = cfg["batches"][0]
        if part == "build":
            self.worker("build")
        elif part.startswith("e2e_"):
            _, mode, b = part.split("_")
            batch = int(b[1:])
            first = part == f"e2e_compiled_b{b0}"
            # the first compiled job runs first, on a fresh inductor cache and compile-cache folder: its first
            # batch is the first actor's warm-up, and its images feed the feature stage. Every part but
            # warm_later then shares that inductor cache (as actors on one node do).
            self.job(part, mode, batch, "first", cfg["jobs_batches"],
                     "out_e2e" if first else f"out_{part}")
        elif part.startswith("raw_"):
            _, mode, b = part.split("_")
            self.worker(part, "--mode", mode, "--batch", b[1:], env=self.inductor_env("first"))
            self.ratio(mode, int(b[1:]))
        elif part == "warm_later":
            self.job(part, "compiled", b0, "later", 3, "out_warm_later")
            first, later = self.rows.get(f"e2e_compiled_b{b0}", {}), self.rows.get(part, {})
            if "warmup_s" in first and "warmup_s" in later:
                self.record(result_line("warmup", first_actor_s=first["warmup_s"], later_actor_s=later["warmup_s"],
                                        later_loaded_bytes=later.get("cache_loaded_bytes", 0)))
        elif part.startswith("profile_b"):
            self.worker(part, "--batch", part[len("profile_b"):])
        elif part == "features":
            self.worker(part)
            feat, gen = self.rows.get("features", {}), self.rows.get(f"e2e_compiled_b{b0}", {})
            if "images_per_s" in feat and "images_per_s" in gen:
                self.record(result_line("features_vs_generation", features_images_per_s=feat["images_per_s"],
                                        generation_images_per_s=gen["images_per_s"],
                                        keeps_pace=float(feat["images_per_s"]) >= float(gen["images_per_s"])))
        elif part.startswith("switch_"):
            self.worker(part, "--mode", "compiled", "--batch", str(b0), "--switch", part[len("switch_"):],
                        env=self.inductor_env("first"))
        else:
            raise SystemExit(f"unknown part {part!r}")

    def main(self) -> int:
        all_parts = plan(self.cfg)
        wanted = set(self.args.parts.split(",")) if self.args.parts else None
        if wanted:
            unknown = wanted - {p for p, _ in all_parts}
            if unknown:
                raise SystemExit(f"--parts: unknown {sorted(unknown)}; known: {[p for p, _ in all_parts]}")
        skipped = []
        for part, est in all_parts:
            if wanted and part not in wanted:
                continue
            if part != "build" and not (self.work / "model").exists():
                self.record(result_line(part, status="skipped", reason="no_model"))
                continue
            if self.left() < est:
                skipped.append(part)
                self.record(result_line(part, status="skipped", reason="budget", left_s=self.left(), est_s=est))
                continue
            self.do(part)
        self.record(result_line("done", seconds=self.args.budget_s - self.left(), skipped=",".join(skipped) or "none"))
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks every code path in about a minute")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_e2e"))
    ap.add_argument("--work", help="scratch folder for models, manifests and outputs (default <out>/work)")
    ap.add_argument("--budget-s", type=float, default=510.0, help="stop starting parts when this runs out")
    ap.add_argument("--parts", help="comma-separated subset of the parts (default: all, in priority order)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="compiled", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--switch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or os.path.join(args.out, "work")
    cfg = config(args.smoke)
    if not args.smoke and not args.worker:
        import shutil

        if not shutil.which("nvidia-smi"):
            raise SystemExit("gpu_e2e: no GPU here (nvidia-smi not found); use --smoke for the CPU check")
    if args.worker:
        work, part = Path(args.work), args.worker
        if part == "build":
            worker_build(cfg, work)
        elif part.startswith("raw_") or part.startswith("switch_"):
            worker_raw(cfg, work, part, args.mode, args.batch, args.switch)
        elif part.startswith("profile_b"):
            worker_profile(cfg, work, part, args.batch)
        elif part == "features":
            worker_features(cfg, work, part)
        return
    sys.exit(Driver(args, cfg).main())


if __name__ == "__main__":
    main()

"""Speed switches and the fp16 black-image triage: off is bit-identical, on stays within 1/255 (CPU fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch.spec.base import Optimizations
from batch.models.load import load_model, make_scheduler
from batch.sampling.txt2img import SamplingParams, decode, txt2img
from batch.models.speed import apply_optimizations
from batch.models.tiny import tiny_components

PARAMS = SamplingParams(height=64, width=64, num_inference_steps=4, guidance_scale=7.5)
PROMPTS, NEGS, SEEDS = ["a red cube", "a blue sphere"], [None, "blurry"], [3, 4]


def _generate(opts: Optimizations | None) -> np.ndarray:
    model = load_model("tiny", dtype="float32", device="cpu")
    if opts is not None:
        apply_optimizations(model, opts)
    return txt2img(model, make_scheduler("pndm", model.scheduler_config), PROMPTS, NEGS, SEEDS, PARAMS)


@pytest.fixture(scope="module")
def plain():
    return _generate(None)


def test_default_switches_change_nothing(plain):
    assert np.array_equal(_generate(Optimizations()), plain)


@pytest.mark.parametrize("opts", [
    Optimizations(attention="math"),
    Optimizations(channels_last=True),
    Optimizations(fuse_qkv=True),
    Optimizations(attention="math", channels_last=True, fuse_qkv=True, vae_dtype="float32", cudnn_benchmark=True),
    # inductor's C++ backend on CPU: about a minute to compile the tiny UNet (slow: not in `make test-fast`)
    pytest.param(Optimizations(compile=True), marks=pytest.mark.slow),
    # (compile_vae's numerics are not run here: the tiny VAE decoder through inductor's C++ backend took one to
    # three minutes on 2 cores, over the suite's time budget; test_compile_vae_compiles_the_decoder_only checks the
    # switch, and bench/gpu_e2e.py measures it on a GPU)
], ids=["math-attention", "channels-last", "fused-qkv", "all-eager", "compile"])
def test_switches_on_stay_within_one_level(plain, opts, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # process-wide switch: restored after
    assert np.abs(_generate(opts).astype(int) - plain).max() <= 1


def test_applied_switches_are_reported():
    model = load_model("tiny", dtype="float32", device="cpu")
    done = apply_optimizations(model, Optimizations(channels_last=True, fuse_qkv=True))
    assert done == {"attention": "sdpa", "fuse_qkv": True, "channels_last": True}
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def _overflowing_vae():
    """The tiny VAE with one layer scaled so fp16 activations overflow (the SD2.1 / x4 fp16 failure)."""
    vae = tiny_components()["vae"].eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(3e4)
    return vae


def test_nan_fp16_decode_is_rescued_by_an_fp32_redecode():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = _overflowing_vae()
    reference = decode(vae, latents)  # fp32: finite and not black
    assert all(img.max() > 0 for img in reference)
    vae16 = vae.to(torch.float16)
    with np.errstate(invalid="ignore"):
        broken = decode(vae16, latents.half())
    assert all(img.max() == 0 for img in broken)  # NaN quantises to an all-black image
    rescued: list[bool] = []
    fixed = decode(vae16, latents.half(), fallback=True, rescued=rescued)
    assert rescued == [True, True, True]
    assert np.abs(fixed.astype(int) - reference).max() <= 1  # fp16-rounded weights, fp32 arithmetic
    assert vae16.dtype == torch.float16  # the VAE is back in its own dtype afterwards


def test_healthy_fp16_decode_is_left_alone():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    vae16 = tiny_components()["vae"].eval().to(torch.float16)
    rescued: list[bool] = []
    out = decode(vae16, latents.half(), fallback=True, rescued=rescued)
    assert rescued == [False, False] and np.array_equal(out, decode(vae16, latents.half()))


# --- issue 18: CUDA graphs / compiled VAE / pinned copies / persistent compile cache --------------------------

def test_device_quantisation_gives_the_same_bytes_as_the_numpy_path():
    from batch.sampling.txt2img import quantize_on_device

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    x[0, 0, 0, :11] = torch.arange(11) / 510  # exact halves of a level: round half to even on both paths
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        reference = (xd.permute(0, 2, 3, 1).float().numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(quantize_on_device(xd).numpy(), reference)


def test_cuda_only_switches_are_refused_on_cpu_naming_the_field():
    model = load_model("tiny", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="optimizations.pinned_memory: .*CUDA"):
        apply_optimizations(model, Optimizations(pinned_memory=True))
    with pytest.raises(ValueError, match="optimizations.compile_mode: reduce-overhead means CUDA graphs"):
        apply_optimizations(model, Optimizations(compile=True, compile_mode="reduce-overhead"))
    assert not hasattr(model.unet, "_orig_mod")  # refused before anything was compiled


def test_a_cpu_spec_refuses_the_cuda_only_switches():
    from batch.spec.base import SpecError
    from batch.spec.config import parse_spec

    with pytest.raises(SpecError, match="optimizations.pinned_memory: .*device is cpu"):
        parse_spec({"device": "cpu", "optimizations": {"pinned_memory": True}})
    assert parse_spec({"device": "cuda", "optimizations": {"pinned_memory": True}}).optimizations.pinned_memory


def test_compile_cache_needs_something_to_compile():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compile_cache: set compile or compile_vae"):
        Optimizations(compile_cache="/tmp/cache")
    assert Optimizations(compile_vae=True, compile_cache="/tmp/cache").compile_cache == "/tmp/cache"


def test_compile_vae_compiles_the_decoder_only():
    model = load_model("tiny", dtype="float32", device="cpu")
    decoder, unet = model.vae.decoder, model.unet
    done = apply_optimizations(model, Optimizations(compile_vae=True))
    assert done["compile_vae"] == {"mode": "default"}
    assert model.vae.decoder._orig_mod is decoder and model.unet is unet  # wrapped, not run (compiles lazily)


def test_clone_outputs_copies_graph_outputs_and_forwards_attributes():
    from batch.models.speed import CloneOutputs

    lin = torch.nn.Linear(3, 2)
    lin.config = {"in_channels": 3}
    keep = []

    def fwd(x):
        keep.append(lin.weight @ x.T)
        return (keep[-1],)

    lin.forward = fwd
    wrapped = CloneOutputs(lin)
    out = wrapped(torch.ones(1, 3))
    assert torch.equal(out[0], keep[-1]) and out[0].data_ptr() != keep[-1].data_ptr()
    assert wrapped.config == {"in_channels": 3} and wrapped.weight is lin.weight


def test_compile_cache_file_round_trip(tmp_path, monkeypatch):
    """Save only after a call that compiled (an inductor cache miss), atomically; load what was saved;
    an unreadable file is a cold start, not an error."""
    from torch._dynamo.utils import counters

    from batch.models.speed import CompileCache

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: loaded.append(blob) or "info")
    first = CompileCache(str(tmp_path / "cc"), torch.device("cpu"))
    assert first.load()["loaded_bytes"] == 0
    assert first.save_if_new() is False  # nothing compiled yet
    monkeypatch.setitem(counters["inductor"], "fxgraph_cache_miss", counters["inductor"]["fxgraph_cache_miss"] + 1)
    assert first.save_if_new() is True and first.save_if_new() is False
    assert [p.name for p in (tmp_path / "cc").iterdir()] == [f"torch-{torch.__version__}-cpu.bin".replace("+", "_")]
    later = CompileCache(str(tmp_path / "cc"), torch.device("cpu"))
    assert later.load()["loaded_bytes"] == len(b"artifacts") and loaded == [b"artifacts"]

    def broken(blob):
        raise RuntimeError("incompatible artifacts")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", broken)
    assert CompileCache(str(tmp_path / "cc"), torch.device("cpu")).load()["loaded_bytes"] == 0


def test_sampler_loads_the_compile_cache_before_compiling(tmp_path, monkeypatch):
    import pyarrow as pa

    from batch.plan.manifest import plan
    from batch.run.stages import Sampler, SamplerSettings
    from batch.spec.config import parse_spec
    from batch.store.schema import RESERVED_COLUMNS

    order = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: order.append("load") or "info")
    monkeypatch.setattr(torch, "compile", lambda module, **kw: order.append("compile") or module)
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / f"torch-{torch.__version__}-cpu.bin".replace("+", "_")).write_bytes(b"xyz")
    opts = Optimizations(compile=True, compile_cache=str(tmp_path / "cc"))
    sampler = Sampler(SamplerSettings(model="tiny", device="cpu", batch_size=2, optimizations=opts))
    assert order == ["load", "compile"]
    assert sampler.optimized["compile_cache"]["loaded_bytes"] == 3
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 2}})
    out = sampler(plan(pa.Table.from_pylist([{"id": "a", "prompt": "x"}]), spec, RESERVED_COLUMNS).items)
    assert out.column("status").to_pylist() == ["ok"]
    assert '"loaded_bytes": 3' in out.column("optimizations")[0].as_py()


_CACHE_SCRIPT = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from batch.models.speed import CompileCache
cache = CompileCache(sys.argv[1], torch.device("cpu"))
info = cache.load()
def f(x):  # one pointwise kernel: C++ compiles take seconds each on a shared 2-core machine
    return torch.nn.functional.silu(x) * 2 + 1
fn = torch.compile(f)
t0 = time.perf_counter()
with torch.no_grad():
    out = fn(torch.linspace(-2, 2, 16))
seconds = time.perf_counter() - t0
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "saved": cache.save_if_new(), "loaded": info["loaded_bytes"], "s": seconds,
                  "out": out.flatten().tolist()}))
"""


@pytest.mark.slow
def test_a_second_process_warms_from_the_saved_compile_cache(tmp_path):
    """Two processes with separate inductor cache folders (two nodes): the second loads the first's
    torch.compiler artifacts and its compile hits inductor's FX graph cache instead of generating code.
    (On CPU the C++ kernels are still compiled from the cached source, so the time barely drops here; on
    a GPU inductor bundles the compiled Triton kernels into those entries, ``bundle_triton_into_fx_graph_cache``.)
    About 40-55 s on 2 busy cores."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = []
    for name in ("first", "second"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"),
                   PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path / "artifacts")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["loaded"] == 0 and first["miss"] >= 1 and first["hit"] == 0 and first["saved"] is True
    assert second["loaded"] > 0 and second["hit"] >= 1 and second["miss"] == 0 and second["saved"] is False
    assert second["out"] == first["out"]

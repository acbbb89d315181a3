"""Speed switches applied to a loaded model: attention kernel, memory layout, fused QKV, torch.compile.

Each switch is off by default (``config.Optimizations``), so the default path is bit-identical to plain
diffusers; with them on, outputs stay within 1/255 on CPU fp32 (``tests/test_speed.py``).

1. attention: ``sdpa`` is diffusers' default ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``, which
   picks flash / memory-efficient kernels on GPU); ``math`` is the classic ``AttnProcessor`` (reference).
2. channels_last: NHWC layout for the UNet and VAE, which cuDNN's tensor-core convolutions prefer.
3. fuse_qkv: ``unet.fuse_qkv_projections()``: one GEMM instead of three per self-attention.
4. compile: ``torch.compile`` of the UNet's forward; recompiles per new latent shape, so buckets help.
5. cudnn_benchmark: cuDNN times its convolution algorithms for each new shape and keeps the fastest.
6. vae_dtype float32: the VAE runs in fp32 whatever the model dtype (the SD2.1 / x4 fp16 NaN failure mode).
7. compile_mode reduce-overhead: CUDA graphs (inductor's cudagraph trees) for the compiled UNet, one graph
   per bucket shape; refused on CPU. A graph's output buffer is overwritten by its next replay, and the
   multistep schedulers keep past model outputs (PNDM's ``ets``), so the UNet's outputs are cloned
   (:class:`CloneOutputs`; PyTorch docs "CUDAGraph Trees": outputs of a prior replay must not be accessed).
8. compile_vae: ``torch.compile`` of the VAE decoder (``vae.decoder``) with the same mode.
9. pinned_memory: decoded images are quantised to uint8 on the device and copied to a pinned host buffer
   (``non_blocking``), instead of copying fp16/fp32 pixels and quantising on the CPU; CUDA only.
10. compile_cache: :class:`CompileCache`, torch.compiler's portable cache artifacts
   (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: inductor FX graph, AOT autograd,
   autotuning and Triton kernel caches in one blob) kept at a storage location, so an actor that loads them
   skips inductor's code generation and kernel compilation (Dynamo still traces).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch

from batch.spec.base import Optimizations

log = logging.getLogger(__name__)


def check_device(opts: Optimizations, device: torch.device) -> None:
    """Refuse the CUDA-only switches on another device, naming the field."""
    problem = opts.cuda_only()
    if device.type != "cuda" and problem:
        raise ValueError(f"{problem}, not {device}")


class CloneOutputs(torch.nn.Module):
    """Wraps a CUDA-graphed module: marks a new graph step before each call and returns copies of its
    outputs, which the next replay would overwrite. Attributes (``config``, ``dtype``) come from the module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def apply_optimizations(model: Any, opts: Optimizations) -> dict[str, Any]:
    """Apply ``opts`` to ``model`` (a :class:`batch.models.load.LoadedModel`) in place; return what was done."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    check_device(opts, model.device)
    done: dict[str, Any] = {}
    if opts.attention == "math":
        model.unet.set_attn_processor(AttnProcessor())
        model.vae.set_attn_processor(AttnProcessor())
        done["attention"] = "math"
    else:
        done["attention"] = "sdpa" if any(isinstance(p, AttnProcessor2_0)
                                          for p in model.unet.attn_processors.values()) else "other"
    if opts.fuse_qkv:
        model.unet.fuse_qkv_projections()
        done["fuse_qkv"] = True
    if opts.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if opts.vae_dtype == "float32" and model.vae.dtype != torch.float32:
        model.vae.to(dtype=torch.float32)
        done["vae_dtype"] = "float32"
    if opts.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # process-wide: the actor holds one model, so one setting
        done["cudnn_benchmark"] = True
    if opts.compile:
        t0 = time.perf_counter()
        model.unet = torch.compile(model.unet, mode=opts.compile_mode, fullgraph=False)
        if opts.compile_mode == "reduce-overhead":
            model.unet = CloneOutputs(model.unet)
        done["compile"] = {"mode": opts.compile_mode, "wrap_seconds": time.perf_counter() - t0}
    if opts.compile_vae:
        # the decoder only: vae.decode() keeps its own post_quant_conv and output handling
        model.vae.decoder = torch.compile(model.vae.decoder, mode=opts.compile_mode, fullgraph=False)
        done["compile_vae"] = {"mode": opts.compile_mode}
    if opts.pinned_memory:
        done["pinned_memory"] = True
    return done


def _counter(name: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"][name])


class CompileCache:
    """torch.compiler cache artifacts at ``location`` (a folder: local path or fsspec URI), one file per
    torch version and device kind (``torch-<version>-<device>.bin``).

    :meth:`load` runs before anything is compiled (``torch.compiler.load_cache_artifacts``: later compiles of
    the same graphs hit inductor's caches); :meth:`save_if_new` runs after each sampler call and writes
    ``torch.compiler.save_cache_artifacts()`` when that call compiled something new (inductor's FX graph
    cache missed). Writes go to a temporary name first and are then moved into place, so concurrent actors
    never leave a half-written file. A missing, unreadable or incompatible file only means a cold start.
    """

    def __init__(self, location: str, device: torch.device, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
        kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        name = "".join(c if c.isalnum() or c in ".-_" else "_" for c in f"torch-{torch.__version__}-{kind}")
        self.path = f"{root.rstrip('/')}/{name}.bin"
        self.loaded_bytes = 0
        self.saved_bytes = 0
        self._misses = 0

    def load(self) -> dict[str, Any]:
        """Load the artifacts if present; returns ``{"path", "loaded_bytes", "load_seconds"}``."""
        t0 = time.perf_counter()
        try:
            if self.fs.exists(self.path):
                with self.fs.open(self.path, "rb") as f:
                    blob = f.read()
                if torch.compiler.load_cache_artifacts(blob) is not None:
                    self.loaded_bytes = len(blob)
        except Exception as err:  # a cold start, never a failed job
            log.warning("compile cache %s not loaded: %s: %s", self.path, type(err).__name__, err)
        self._misses = _counter("fxgraph_cache_miss")
        return {"path": self.path, "loaded_bytes": self.loaded_bytes,
                "load_seconds": round(time.perf_counter() - t0, 3)}

    def save_if_new(self) -> bool:
        """Save the process's artifacts when inductor compiled (missed its cache) since the last check."""
        misses = _counter("fxgraph_cache_miss")
        if misses == self._misses:
            return False
        self._misses = misses
        try:
            out = torch.compiler.save_cache_artifacts()
            if out is None:
                return False
            blob = out[0]
            parent = self.path.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
            with self.fs.open(tmp, "wb") as f:
                f.write(blob)
            self.fs.mv(tmp, self.path)
            self.saved_bytes = len(blob)
            return True
        except Exception as err:
            log.warning("compile cache %s not saved: %s: %s", self.path, type(err).__name__, err)
            return False

"""Where a stage computes: the torch device for a resolved ``device`` and the identity of the process.

Ray gives an actor that requested GPUs its own ``CUDA_VISIBLE_DEVICES``; :func:`worker_id` records it,
so each metadata row says which host, process, GPU (and Ray node) made its image.

Test-only switch: with ``SDBATCH_TEST_CUDA_ON_CPU=1`` in the environment, a stage resolved to ``cuda``
computes on the CPU while keeping everything Ray sees (GPU requests, one GPU per actor). It is how the
GPU plumbing is tested on machines without a GPU (``tests/test_gpu_plumbing.py``); never set it in a job.
"""

from __future__ import annotations

import os
import socket

CUDA_ON_CPU_ENV = "SDBATCH_TEST_CUDA_ON_CPU"


def torch_device(device: str) -> str:
    """The torch device a stage resolved to ``device`` computes on (``cuda`` unless the test switch is on)."""
    if device.startswith("cuda") and os.environ.get(CUDA_ON_CPU_ENV) == "1":
        return "cpu"
    return device


def worker_id(node: str | None = None) -> str:
    """``host:pid``, plus ``/gpu<ids>`` when Ray (or the user) made GPUs visible to this process, plus
    ``/node-<id>`` (the first 12 hex digits of the Ray node id) when the caller knows it: several Ray nodes
    may share one host (``ray.cluster_utils.Cluster``, several pods on one machine)."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return (f"{socket.gethostname()}:{os.getpid()}" + (f"/gpu{gpus}" if gpus else "")
            + (f"/node-{node[:12]}" if node else ""))

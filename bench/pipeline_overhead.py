"""Pipeline overhead: the same manifest through ``sdbatch run`` (Ray, actors, encode/write stage, commits)
versus a raw in-process loop calling the same sampler on the same model, batch size and device.

Both are measured at steady state, the same way: images after the first (warm-up) batch divided by the
time from the end of the first batch to the end of the last. For the job the batch end times are the
metadata's ``sampled_at`` (written by the actor), so the figure is the sampler's pace while the whole
pipeline (Ray Data executor, encode/write stage, commits, Ray's own daemons) runs beside it. The raw loop is
timed before and after the job and the job is compared with their mean. The job's start-up (Ray, actor,
model load, first block) and its end-to-end rate are reported separately.

On CPU the model is ``common.CPU_UNET`` (random weights), sized so one denoising step takes >= 50 ms. The
sampler is the "device": by default (``--cpus-per-actor host-core``) it gets every CPU but one and as many
torch threads as the raw loop, and the pipeline runs on the remaining core, as it runs on a GPU node's host
CPUs beside the GPU. ``--cpus-per-actor auto`` gives the sampler every core as ``sdbatch run`` does on a CPU
node; then the figure also measures how OpenMP threads suffer from sharing their cores (BENCHMARKS.md).

    .venv/bin/python bench/pipeline_overhead.py [--images 32] [--batch-size 2] [--steps 8] [--size 128]
        [--device cpu|cuda] [--cpus-per-actor host-core|auto|N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import emit, save_model

from batch.spec.config import parse_spec
from batch.run.job import run_job
from batch.run.stats import steady_rate
from batch.models.load import load_model, make_scheduler
from batch.run.pipeline import resolve_resources
from batch.sampling.txt2img import SamplingParams, txt2img
from batch.store.commit import read_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpus-per-actor", default="host-core",
                    help="the spec's cpus_per_actor: a number, 'auto' (every CPU but the writer's), or "
                         "'host-core' (default: every CPU but one, which is left to the pipeline)")
    args = ap.parse_args()

    cpus = float(len(os.sched_getaffinity(0)))
    cpa = {"auto": None, "host-core": max(1.0, cpus - 1)}.get(args.cpus_per_actor) or float(args.cpus_per_actor)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = save_model(tmp / "model", "cpu")
        rows = [{"id": f"r{i:04d}", "prompt": f"benchmark prompt {i}", "seed": i} for i in range(args.images)]
        pq.write_table(pa.Table.from_pylist(rows), tmp / "m.parquet")
        spec = parse_spec({"model": str(folder), "device": args.device, "dtype": "float32", "progress": False,
                           "manifest": str(tmp / "m.parquet"), "output": str(tmp / "out"), "actors": 1,
                           "batch_size": args.batch_size, "commit_every": 10_000,
                           "cpus_per_actor": cpa,
                           "defaults": {"height": args.size, "width": args.size, "num_inference_steps": args.steps,
                                        "scheduler": "pndm"}})
        res = resolve_resources(spec, {"CPU": cpus}, local=True)

        # 1. raw loop: same model, same threads as the actor, same batches, no Ray, no encoding, no I/O.
        #    Timed before and after the job: a shared VM's speed drifts by 20% between minutes, so the job is
        #    compared with the mean of the two and both are reported.
        torch.set_num_threads(res.threads_per_actor)
        model = load_model(str(folder), dtype="float32", device=args.device)
        params = SamplingParams(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5)
        batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

        def raw_loop() -> tuple[float, float]:
            times = []
            for batch in batches:
                t0 = time.perf_counter()
                txt2img(model, make_scheduler("pndm", model.scheduler_config), [r["prompt"] for r in batch],
                        [None] * len(batch), [r["seed"] for r in batch], params)
                times.append(time.perf_counter() - t0)
            steady = batches[1:]
            return sum(len(b) for b in steady) / sum(times[1:]), 1000 * sum(times[1:]) / (len(steady) * args.steps)

        raw_before, step_ms = raw_loop()

        # 2. the job through Ray; its steady pace from the actor's batch end times
        summary = run_job(spec)
        raw_after, _ = raw_loop()
        raw_ips = (raw_before + raw_after) / 2
        assert summary.images_ok == args.images, summary.text()
        meta = read_metadata(spec.output)
        ends = Counter(meta.column("sampled_at").to_pylist())
        job_ips = steady_rate(ends)  # from the actor's batch ends
        t_sample = sum(meta.column("t_sample_s").to_pylist()) / meta.num_rows
        emit({"bench": "pipeline_overhead", "device": args.device, "images": args.images,
              "batch_size": args.batch_size, "steps": args.steps, "size": args.size,
              "threads": res.threads_per_actor, "cpus_per_actor": res.cpus_per_actor, "cpus": cpus, "raw_step_ms": round(step_ms, 1),
              "raw_images_per_s": round(raw_ips, 4), "raw_before_after": [round(raw_before, 4), round(raw_after, 4)], "job_steady_images_per_s": round(job_ips, 4),
              "ratio": round(job_ips / raw_ips, 3),
              "job_sampler_s_per_image": round(t_sample, 4), "raw_s_per_image": round(1 / raw_ips, 4),
              "job_images_per_s_incl_startup": round(summary.images_per_second, 4),
              "job_startup_s": round(summary.first_result_seconds, 2), "job_total_s": round(summary.seconds, 2),
              "job_steady_window": [round(min(ends), 2), round(max(ends), 2)]})


if __name__ == "__main__":
    main()

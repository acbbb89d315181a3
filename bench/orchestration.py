"""Orchestration ceiling: the dry run (``model: none``) through the whole job, and what the driver costs.

A synthetic manifest of N rows (``id``, ``prompt``; one image each) goes through the real
:func:`batch.run.job.run_job` with ``model: none`` (seeded noise tiles, no model: ``batch/sampling/dryrun.py``)
on an embedded local Ray: planning, the sampler actor pool, the encode/write actors, metadata commits,
``_SUCCESS``. Measured (issue 15; target: driver <= 0.25 CPU-ms per image, i.e. one driver core commits
4,000 images/s):

* committed images/s: images / wall time of the stream-and-commit step (first block to last commit), and
  images / wall time of the whole ``run_job`` (manifest read, planning, Ray start, stream, finish);
* the DRIVER process's CPU seconds per 1,000 images: ``resource.getrusage(RUSAGE_SELF)`` user+sys of this
  process only (every driver thread: the main loop, Ray Data's executor thread, Ray's core-worker threads;
  the Ray daemons and actors are other processes), over the whole job and per step of ``run_job``
  (``open_run``, ``plan_work``, ``record_attempt``, ``stream_and_commit``, ``finish``, each timed by wrapping
  the module function; "ray start + other" is the rest);
* the driver's CPU during stream_and_commit split by thread (``/proc/self/task/*/stat``: main thread, Python
  threads by name, Ray's native threads by their OS name), since cProfile sees only the main thread;
* with ``--profile FILE``: cProfile of the main thread over the whole job, timed by the thread's CPU clock
  (``time.thread_time``: waits cost nothing), saved as a pstats file; its top entries by cumulative CPU printed.

Every ``--rows`` value is a separate job (same process, Ray started afresh by each). Run it under the
machine-wide Ray lock on a shared machine:

    flock /tmp/sdbatch-ray.lock .venv/bin/python bench/orchestration.py --rows 10000 100000 [--size 64]
        [--batch-size 4] [--actors 1] [--output-format files] [--profile /tmp/orch.pstats] [--keep DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import emit

from batch.run import job as job_module
from batch.run.job import run_job
from batch.spec.config import parse_spec

STEPS = ("open_run", "plan_work", "record_attempt", "stream_and_commit", "finish")
TARGET_CPU_MS_PER_IMAGE = 0.25


def driver_cpu_s() -> float:
    """User + system CPU seconds of this process (all its threads; no child processes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, keyed by name (Python name where Python knows the
    thread, else the OS name), summed over threads of one name."""
    tick = os.sysconf("SC_CLK_TCK")
    py_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (proc(5) fields 14, 15)
        name = py_names.get(int(tid), f"os:{comm}")
        out[name] = out.get(name, 0.0) + cpu
    return out


class StepTimer:
    """Wrap ``run_job``'s step functions (looked up by name in ``batch.run.job``) with CPU and wall timers."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.threads_before: dict[str, float] = {}
        self.threads_after: dict[str, float] = {}  # at the end of stream_and_commit, while Ray's threads live
        self._saved = {name: getattr(job_module, name) for name in STEPS}

    def __enter__(self) -> "StepTimer":
        for name, fn in self._saved.items():
            setattr(job_module, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(job_module, name, fn)

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            if name == "stream_and_commit":
                self.threads_before = thread_cpu()
            c0, w0 = driver_cpu_s(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if name == "stream_and_commit":
                    self.threads_after = thread_cpu()
                self.cpu[name] = self.cpu.get(name, 0.0) + driver_cpu_s() - c0
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
        return wrapper


def write_manifest(path: Path, rows: int) -> None:
    ids = [f"r{i:08d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"dry run prompt {i}" for i in range(rows)]}), path)


def one_run(rows: int, args, tmp: Path, profile: str | None) -> dict:
    manifest = tmp / f"m{rows}.parquet"
    write_manifest(manifest, rows)
    out = tmp / f"out{rows}"
    spec = parse_spec({"model": "none", "device": "cpu", "manifest": str(manifest), "output": str(out),
                       "actors": args.actors, "batch_size": args.batch_size, "progress": False,
                       "output_format": args.output_format,
                       "defaults": {"height": args.size, "width": args.size}})
    load0 = os.getloadavg()
    # timer: the main thread's CPU time, so entries are CPU spent (waits on Ray cost nothing), not wall time
    prof = cProfile.Profile(time.thread_time) if profile else None
    c0, w0 = driver_cpu_s(), time.perf_counter()
    with StepTimer() as steps:
        if prof:
            prof.enable()
        summary = run_job(spec)
        if prof:
            prof.disable()
    cpu, wall = driver_cpu_s() - c0, time.perf_counter() - w0
    load1 = os.getloadavg()
    assert summary.complete and summary.images_ok == rows, summary.text()
    # CPU of each driver thread during stream_and_commit (threads started in it count from zero)
    per_thread = {k: round(v - steps.threads_before.get(k, 0.0), 2) for k, v in steps.threads_after.items()
                  if v - steps.threads_before.get(k, 0.0) >= 0.05}
    # threads that ended before the snapshot (Ray Data's executor threads end with the dataset)
    per_thread["ended_before_snapshot"] = round(steps.cpu["stream_and_commit"] - sum(
        v - steps.threads_before.get(k, 0.0) for k, v in steps.threads_after.items()), 2)
    stream_wall = steps.wall["stream_and_commit"]
    step_cpu = {k: round(v, 3) for k, v in steps.cpu.items()}
    step_cpu["ray_start_and_other"] = round(cpu - sum(steps.cpu.values()), 3)
    result = {
        "bench": "orchestration", "rows": rows, "images": summary.images_ok, "size": args.size,
        "batch_size": args.batch_size, "actors": args.actors, "output_format": args.output_format,
        "commit_every": spec.commit_every, "metadata_parts": None,
        "wall_s": round(wall, 2), "stream_wall_s": round(stream_wall, 2),
        "committed_images_per_s_stream": round(rows / stream_wall, 1),
        "committed_images_per_s_total": round(rows / wall, 1),
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_s_per_1000": round(1000 * cpu / rows, 3),
        "driver_cpu_ms_per_image": round(cpu / rows * 1000, 4),
        "stream_driver_cpu_ms_per_image": round(steps.cpu["stream_and_commit"] / rows * 1000, 4),
        "plan_driver_cpu_ms_per_image": round((steps.cpu["open_run"] + steps.cpu["plan_work"]) / rows * 1000, 4),
        "target_cpu_ms_per_image": TARGET_CPU_MS_PER_IMAGE,
        "step_cpu_s": step_cpu, "step_wall_s": {k: round(v, 2) for k, v in steps.wall.items()},
        "stream_thread_cpu_s": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
        "cpus": len(os.sched_getaffinity(0)),
    }
    record = (out / "run.json")
    if record.exists():
        import json

        result["metadata_parts"] = json.loads(record.read_text()).get("attempts", [{}])[-1].get("metadata_parts")
    if prof:
        prof.dump_stats(profile)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
        print(buf.getvalue(), flush=True)
    if args.keep:
        shutil.copytree(out, Path(args.keep) / out.name, dirs_exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000])
    ap.add_argument("--size", type=int, default=64, help="image height and width (multiple of 8)")
    ap.add_argument("--batch-size", type=int, default=4, help="the spec's batch_size (images per sampler call)")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--output-format", default="files", choices=["files", "webdataset", "parquet"])
    ap.add_argument("--profile", help="cProfile the main thread of the LAST --rows run into this pstats file")
    ap.add_argument("--top", type=int, default=25, help="pstats entries printed with --profile")
    ap.add_argument("--keep", help="copy each run's output here (default: deleted after measuring)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="sdbatch-orch-") as tmp:
        for i, rows in enumerate(args.rows):
            profile = args.profile if i == len(args.rows) - 1 else None
            emit(one_run(rows, args, Path(tmp), profile))


if __name__ == "__main__":
    main()

"""What a run did, in numbers: counts over the committed metadata, throughput, warm-up, the summary.

Pure functions over metadata tables; the job feeds them the blocks it committed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batch.plan.manifest import failure_reason
from batch.store.schema import DONE_STATUSES

# Exit codes of the commands that run jobs (README "Exit codes"); 2 (unusable spec, manifest or model) is
# decided by ``batch.cli`` before any job starts.
EXIT_OK = 0
EXIT_ROWS_FAILED = 1  # the run finished, but more rows failed than ``max_failed_fraction`` allows
EXIT_UNUSABLE_INPUT = 2
EXIT_ENVIRONMENT = 3  # storage unwritable or full, cluster lost, or the run ended incomplete: `resume` later

@dataclass
class Summary:
    """What a run has done so far, over all its attempts; ``exit_code`` applies ``max_failed_fraction``."""

    run_id: str
    output: str
    attempt: str = ""
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    images_ok: int = 0
    images_failed: int = 0
    images_pending: int = 0
    images_reused: int = 0  # status skipped: an earlier run (dedup_against) holds the image; counted as done
    images_redecoded_fp32: int = 0  # fp16/bf16 decodes that gave NaN/black and were redone in fp32
    images_this_attempt: int = 0  # images this attempt generated or tried (the rest were already committed)
    images_skipped: int = 0  # already committed by earlier attempts
    seconds: float = 0.0
    generate_seconds: float = 0.0
    first_result_seconds: float = 0.0  # from the start of generation to the first finished block (start-up)
    steady_images_per_second: float = 0.0  # the samplers' pace after their first batch (start-up excluded)
    warmup_seconds: float = 0.0  # first sampler call per actor and shape over later calls (compile included)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    complete: bool = True  # every planned image and row has a committed record (``_SUCCESS`` written)
    exit_code: int = 0

    @property
    def images_per_second(self) -> float:
        ok_now = self.images_this_attempt
        return ok_now / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"run {self.run_id} (attempt {self.attempt}) -> {self.output}",
            f"  rows: {self.rows_ok} ok, {self.rows_failed} failed (of {self.rows})",
            f"  images: {self.images_ok} ok, "
            + (f"{self.images_reused} reused from earlier runs (status skipped), " if self.images_reused else "")
            + f"{self.images_failed} failed, {self.images_pending} pending; "
            f"this attempt {self.images_this_attempt} ({self.images_skipped} already committed), "
            f"{self.images_per_second:.3f} images/s over {self.generate_seconds:.1f}s of generation, "
            f"of which {self.first_result_seconds:.1f}s until the first block (actor start-up); "
            f"{self.steady_images_per_second:.3f} images/s at steady state; "
            f"{self.seconds:.1f}s in all",
        ]
        if self.warmup_seconds >= 1:
            lines.append(f"  sampler warm-up: each actor's first call per image shape took {self.warmup_seconds:.1f}s "
                         "longer than its later calls (kernel and allocator warm-up, and torch.compile when "
                         "optimizations.compile is on)")
        if self.images_redecoded_fp32:
            lines.append(f"  {self.images_redecoded_fp32} image(s) re-decoded in fp32 after a NaN/black fp16 decode")
        for reason, count in sorted(self.failure_reasons.items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"  failed x{count}: {reason}")
        if not self.complete:
            lines.append(f"  INCOMPLETE: {self.images_pending} image(s) and {self.rows - self.rows_ok - self.rows_failed}"
                         f" row(s) have no committed record; _SUCCESS not written. Finish with: sdbatch resume "
                         f"{self.output}")
        return "\n".join(lines)


def sampler_calls(batch: pa.Table) -> dict[tuple, tuple[int, float]]:
    """The sampler calls in a finished block: (worker, height, width, sampled_at) -> (images, seconds).

    Images of one call share the actor's ``worker`` and ``sampled_at`` stamp; ``t_sample_s`` is the call's
    time per image."""
    calls: dict[tuple, tuple[int, float]] = {}
    cols = batch.select(["worker", "height", "width", "sampled_at", "t_sample_s"]).to_pylist()
    for r in cols:
        if r["sampled_at"] is None:
            continue
        key = (r["worker"], r["height"], r["width"], r["sampled_at"])
        n, _ = calls.get(key, (0, 0.0))
        calls[key] = (n + 1, (n + 1) * (r["t_sample_s"] or 0.0))
    return calls


def call_ends(calls: dict[tuple, tuple[int, float]]) -> Counter:
    """Images finished at each sampler-call end stamp (the input of :func:`steady_rate`)."""
    ends: Counter = Counter()
    for (_, _, _, at), (n, _) in calls.items():
        ends[at] += n
    return ends


def warmup_seconds(calls: dict[tuple, tuple[int, float]]) -> float:
    """Extra time of each actor's first sampler call for an image shape over its later calls' median
    (CUDA/cuDNN warm-up, and the ``torch.compile`` of the UNet when that switch is on), averaged over the
    (actor, shape) pairs that had later calls; 0 when none did."""
    by_shape: dict[tuple, list[tuple[float, float]]] = {}
    for (worker, h, w, at), (_, seconds) in calls.items():
        by_shape.setdefault((worker, h, w), []).append((at, seconds))
    extra = []
    for timeline in by_shape.values():
        timeline.sort()
        if len(timeline) > 1:
            later = sorted(t for _, t in timeline[1:])
            extra.append(max(0.0, timeline[0][1] - later[len(later) // 2]))
    return sum(extra) / len(extra) if extra else 0.0


def steady_rate(batch_ends: Counter) -> float:
    """Images per second after the first sampler batch: images of the later batches over the time from
    the first batch's end to the last one's (the ``sampled_at`` stamps); 0 with fewer than two batches."""
    ends = sorted(batch_ends.items())
    if len(ends) < 2 or ends[-1][0] <= ends[0][0]:
        return 0.0
    return sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0])


def tally(meta: pa.Table, rows: int, images_planned: int) -> dict[str, Any]:
    """Counts over a run's (latest-wins) metadata: rows and images by status, failure reasons.

    A row is ok once all its ``num_images`` images are committed done (``ok``, or ``skipped``: reused from an
    earlier run by deduplication), failed once any record of it failed. ``images_ok`` counts generated images,
    ``images_reused`` the skipped ones.
    """
    recs = meta.select(["manifest_row", "image_index", "num_images", "status", "error",
                        "vae_redecoded_fp32"]).to_pylist()
    failed_rows = {r["manifest_row"] for r in recs if r["status"] not in DONE_STATUSES}
    done_images: Counter = Counter()
    wanted: dict[int, int] = {}
    images = ok = 0
    for r in recs:
        if r["image_index"] is not None:
            images += 1
            wanted[r["manifest_row"]] = r["num_images"]
            done_images[r["manifest_row"]] += r["status"] in DONE_STATUSES
            ok += r["status"] == "ok"
    rows_ok = sum(1 for row, n in wanted.items() if row not in failed_rows and done_images[row] == n)
    done = sum(done_images.values())
    return {
        "rows": rows, "rows_ok": rows_ok, "rows_failed": len(failed_rows),
        "images_ok": ok, "images_reused": done - ok, "images_failed": images - done,
        "images_pending": max(0, images_planned - images),
        "images_redecoded_fp32": sum(bool(r["vae_redecoded_fp32"]) for r in recs),
        "failure_reasons": dict(Counter(failure_reason(r["error"] or "unknown") for r in recs
                                        if r["status"] not in DONE_STATUSES)),
    }

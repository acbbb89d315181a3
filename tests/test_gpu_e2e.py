"""bench/gpu_e2e.sh (issue 18): the RESULT format, the time budget, and a ``--smoke`` run of every part on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_e2e import parse_results, result_line  # noqa: E402


def _run(tmp_path: Path, *args: str, timeout: float) -> dict[str, dict[str, str]]:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_e2e.sh"), "--smoke", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu_e2e" / "results.txt").read_text()
    rows = parse_results(text)
    assert len(rows) == text.count("\n"), text  # every line of the results file is a RESULT line
    return {r["part"]: r for r in rows}


def test_result_lines_round_trip():
    line = result_line("e2e_compiled_b32", images_per_s=4.12345678, compiled=True, reason="no GPU = none")
    assert line == "RESULT part=e2e_compiled_b32 images_per_s=4.123 compiled=1 reason=no_GPU_:_none"
    assert parse_results("noise\n" + line + "\n") == [
        {"part": "e2e_compiled_b32", "images_per_s": "4.123", "compiled": "1", "reason": "no_GPU_:_none"}]


def test_parts_past_the_budget_are_skipped_with_a_reason(tmp_path):
    rows = _run(tmp_path, "--budget-s", "0", timeout=120)
    assert rows["build"]["status"] == "skipped" and rows["build"]["reason"] == "budget"
    assert rows["e2e_compiled_b2"] == {"part": "e2e_compiled_b2", "status": "skipped", "reason": "no_model"}
    assert rows["done"]["skipped"] == "build"


@pytest.mark.e2e
def test_smoke_run_measures_every_part(tmp_path):
    rows = _run(tmp_path, timeout=900)
    assert rows["done"]["skipped"] == "none", rows["done"]
    job = rows["e2e_compiled_b2"]
    assert int(job["images_ok"]) == 6 and int(job["images_failed"]) == 0 and int(job["batches"]) == 3
    assert float(job["images_per_s"]) > 0 and float(job["first_batch_s"]) >= float(job["steady_batch_s"]) > 0
    assert float(rows["raw_compiled_b2"]["images_per_s"]) > 0
    ratio = rows["ratio_compiled_b2"]
    assert float(ratio["ratio"]) == pytest.approx(float(ratio["job_images_per_s"]) / float(ratio["raw_images_per_s"]),
                                                  rel=2e-3)
    assert {"first_actor_s", "later_actor_s", "later_loaded_bytes"} <= set(rows["warmup"])
    prof = rows["profile_b2"]
    shares = [float(prof[f"{k}_pct"]) for k in ("attention", "convolution", "matmul", "norm", "elementwise_other")]
    assert sum(shares) == pytest.approx(100, abs=0.1) and float(prof["convolution_pct"]) > 0
    assert float(prof["scheduler_ms_per_step"]) > 0 and float(prof["cfg_combine_ms_per_step"]) > 0
    feats = rows["features"]
    assert int(feats["images"]) == 48 and float(feats["images_per_s"]) > 0 and "tv_max_abs_diff" in feats
    assert rows["features_vs_generation"]["keeps_pace"] in ("0", "1")
    assert rows["switch_pinned_memory"]["status"] == "refused"
    assert "CUDA" in rows["switch_pinned_memory"]["reason"]

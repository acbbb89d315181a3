"""Contact sheet: size from the layout, each cell's pixels equal to the downscaled stored image."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import batch.run.stages as stages
from batch.cli import main as cli_main
from batch.spec.config import parse_spec
from batch.eval.grid import CAPTION_LINES, LINE_HEIGHT, PAD, Layout
from batch.store.commit import MetadataCommitter
from batch.plan.manifest import plan
from batch.store.schema import RESERVED_COLUMNS
from batch.store.io import open_output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run's outputs (images + committed metadata) made in-process: 5 ok images and one failed row."""
    out_uri = str(tmp_path_factory.mktemp("grid") / "run")
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 3}})
    rows = [{"id": f"r{i}", "prompt": f"prompt number {i} " * 5, "seed": 100 + i} for i in range(5)]
    rows.append({"id": "bad", "prompt": ""})
    p = plan(pa.Table.from_pylist(rows), spec, RESERVED_COLUMNS)
    sampler = stages.Sampler(stages.SamplerSettings(model="tiny", dtype="float32", device="cpu", batch_size=5))
    written = stages.encode_and_write(sampler(p.items), stages.WriterSettings(out_uri))
    committer = MetadataCommitter(open_output(out_uri), pa.schema([]), "grid-test", "attempt-1", 100, 3600)
    committer.add(p.failed.append_column("status", pa.array(["failed"])))
    committer.add(written)
    committer.flush()
    return out_uri


def test_grid_size_and_cells(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert cli_main(["grid", run_dir, "--n", "4", "--out", str(out), "--cell", "96"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    layout = Layout(4, 2, 96)
    assert sheet.shape == (2 * (96 + CAPTION_LINES * LINE_HEIGHT + 2 * PAD), 2 * 96, 3)
    assert (layout.size[1], layout.size[0]) == sheet.shape[:2]
    store = open_output(run_dir)
    for i, rid in enumerate(["r0", "r1", "r2", "r3"]):  # first 4 by id; the failed row is skipped
        src = Image.open(store.fs.open(store.path(f"images/{rid}-" + _digest(rid) + "/0.png"))).convert("RGB")
        expected = np.asarray(src.resize((96, 96), Image.BICUBIC))
        x, y = layout.origin(i)
        assert np.array_equal(sheet[y:y + 96, x:x + 96], expected)
        band = sheet[y + 96:y + layout.cell_height, x:x + 96]
        assert (band < 128).any() and (band == 255).mean() > 0.5  # dark caption text on white


def test_grid_defaults_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "all.png"
    assert cli_main(["grid", run_dir, "--out", str(out)]) == 0  # --n 64 > 5 images: all of them, 3 columns
    assert Image.open(out).size == Layout(5, 3, 128).size
    assert "5 images" in capsys.readouterr().out
    assert cli_main(["grid", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2


def _digest(rid):
    import hashlib

    return hashlib.sha256(rid.encode()).hexdigest()[:16]

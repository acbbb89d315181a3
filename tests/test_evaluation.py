"""The evaluation's pieces without Ray: COCO reader, prompt sample, paired manifest, spec, reduction, table, plot,
the feature stage in-process; and one end-to-end `sdbatch eval --limit` run through Ray on tiny models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.spec.base import SpecError
from batch.eval.spec import EvalSpec, job_spec, load_eval_spec
from batch.metrics.reference import ReferenceStats, stats_key
from batch.eval.coco import build_manifest, read_coco_captions, sample_prompts
from batch.eval.report import markdown_table, pareto_plot
from batch.metrics.reduce import reduce_results
from batch.plan.seeds import derive_row_seed
from batch.store.formats import OutputFormat, encode_image

ROOT = Path(__file__).resolve().parent.parent


def write_coco(path: Path, n_images: int = 4, captions_per_image: int = 2) -> Path:
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 10 + i, "file_name": f"{10 + i:012d}.jpg", "height": 40, "width": 56})
        for j in range(captions_per_image):
            anns.append({"id": 1000 - 10 * i - j, "image_id": 10 + i, "caption": f"  Picture {i} of\nthing {j}. "})
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.full((40 + 4 * i, 56, 3), rng.integers(0, 256, 3), np.uint8)
        arr[5:20, 10:30] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(folder / f"{10 + i:012d}.jpg", quality=95)
    return folder


def test_coco_reader_sorts_normalises_and_names_files(tmp_path):
    t = read_coco_captions(str(write_coco(tmp_path / "c.json")))
    rows = t.to_pylist()
    assert t.num_rows == 8
    assert [r["annotation_id"] for r in rows] == sorted(r["annotation_id"] for r in rows)
    first = rows[0]  # id 969: image 13, caption 1
    assert first == {"annotation_id": 969, "image_id": 13, "file_name": "000000000013.jpg",
                     "caption": "Picture 3 of thing 1."}


@pytest.mark.parametrize("content,match", [("[]", "annotations"), ("{not json", "not JSON"),
                                           ('{"annotations": [{"id": 1}]}', r"annotations\[0\]")])
def test_coco_reader_rejects_bad_files(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(SpecError, match=match):
        read_coco_captions(str(tmp_path / "bad.json"))
    with pytest.raises(SpecError, match="not found"):
        read_coco_captions(str(tmp_path / "missing.json"))


def test_sample_is_seeded_distinct_and_carries_derived_seeds(tmp_path):
    caps = read_coco_captions(str(write_coco(tmp_path / "c.json", n_images=10, captions_per_image=5)))
    a, b = sample_prompts(caps, 12, seed=3), sample_prompts(caps, 12, seed=3)
    assert a.equals(b)
    ids = a.column("annotation_id").to_pylist()
    assert len(set(ids)) == 12
    expected = caps.take(pa.array(np.random.default_rng(3).permutation(50)[:12]))
    assert ids == expected.column("annotation_id").to_pylist()  # the documented draw
    assert sample_prompts(caps, 5, seed=3).equals(a.slice(0, 5))  # --limit: the head of the full sample
    assert a.column("seed").to_pylist() == [derive_row_seed(3, f"coco-{i}") for i in ids]
    assert sample_prompts(caps, 12, seed=4).column("annotation_id").to_pylist() != ids
    with pytest.raises(SpecError, match="only 50 captions"):
        sample_prompts(caps, 51, seed=0)


def test_manifest_pairs_prompts_and_seeds_across_scales(tmp_path):
    caps = read_coco_captions(str(write_coco(tmp_path / "c.json")))
    prompts = sample_prompts(caps, 3, seed=0)
    m = build_manifest(prompts, [1.5, 4.0, 8.0], "m1").to_pylist()
    assert len(m) == 9 and len({r["id"] for r in m}) == 9
    for ann in prompts.column("annotation_id").to_pylist():
        rows = [r for r in m if r["coco_annotation_id"] == ann]
        assert sorted(r["guidance_scale"] for r in rows) == [1.5, 4.0, 8.0]
        assert len({r["seed"] for r in rows}) == 1 and len({r["prompt"] for r in rows}) == 1


def test_shipped_eval_configs_load():
    for name, scheduler in [("sd14", "plms"), ("sd21", "ddim")]:
        spec = load_eval_spec(ROOT / f"configs/eval-pareto-{name}.yaml")
        assert spec.guidance_scales == [1.5, 2, 3, 4, 5, 6, 7, 8] and spec.num_prompts == 10_000
        assert spec.num_inference_steps == 50 and (spec.height, spec.width) == (512, 512)
        assert spec.models[0].scheduler == scheduler and spec.clip.model == "openai/clip-vit-large-patch14"
        assert spec.fid.weights.endswith("pt_inception-2015-12-05-6726825d.pth")
        job = job_spec(spec, spec.models[0], "m.parquet", "out")
        assert job.defaults.scheduler == scheduler and job.dtype == "float16" and job.defaults.height == 512
    assert len(load_eval_spec(ROOT / "configs/eval-pareto-tiny.yaml").models) == 2


@pytest.mark.parametrize("patch,match", [
    ({"bogus": 1}, "bogus"),
    ({"guidance_scales": [1.5, -2]}, "guidance_scales"),
    ({"generation": {"model": "x"}}, "set by the evaluation"),
    ({"generation": {"batch_size": 0}}, "generation.batch_size"),
    ({"models": [{"name": "../x", "model": "tiny"}]}, "models.0.name"),
    ({"fid": {"weight": "x"}}, "fid.weight"),
])
def test_eval_spec_errors_name_the_field(tmp_path, patch, match):
    import yaml

    data = {"models": [{"name": "tiny", "model": "tiny"}], **patch}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=match):
        load_eval_spec(tmp_path / "e.yaml")


def test_stats_key_names_weights_preprocessing_and_images():
    imgs = [("file:///a/1.jpg", 10), ("file:///a/2.jpg", 20)]
    k = stats_key("ab" * 32, 512, imgs)
    assert k.startswith("inception-abababababab_") and "bicubic512" in k and "2img" in k
    assert stats_key("cd" * 32, 512, imgs) != k and stats_key("ab" * 32, 256, imgs) != k
    assert stats_key("ab" * 32, 512, imgs[:1] + [("file:///a/3.jpg", 20)]) != k
    assert "legacy_pytorch299" in k and stats_key("ab" * 32, 512, imgs, resize="clean") != k
    assert "clean299" in stats_key("ab" * 32, 512, imgs, resize="clean")


def test_reference_and_generated_features_share_weights_and_resize():
    from batch.metrics.extract import FeatureExtractor
    from batch.metrics.reference import extractor_kwargs

    spec = EvalSpec(models=[{"name": "a", "model": "tiny"}], fid={"resize": "clean", "reference_size": 64})
    ref = extractor_kwargs(spec, reference=True)
    gen = extractor_kwargs(spec, reference=False, clip="c", clip_revision="r")
    assert ref["resize"] == gen["resize"] == "clean" and ref["inception"] == gen["inception"]
    assert ref["reference"] and ref["reference_size"] == 64 and not gen["reference"] and gen["clip"] == "c"
    import inspect

    params = inspect.signature(FeatureExtractor).parameters  # every argument reaches the extractor
    assert set(ref) <= set(params) and set(gen) <= set(params)


def _comparability_stub(spec, ref):
    from batch.eval.evaluation import comparability

    return comparability(spec, ref, "coco/val2017/", 10)


def test_reduce_table_and_plot():
    from batch.eval.report import comparability_caption, comparability_markdown

    rng = np.random.default_rng(0)
    spec = EvalSpec(models=[{"name": "a", "model": "tiny"}, {"name": "b", "model": "tiny", "scheduler": "ddim"}],
                    guidance_scales=[2.0, 7.0], fid={"jackknife_blocks": 5}, clip={"bootstrap": 50},
                    kid={"subsets": 10, "subset_size": 1000})
    ref_feats = rng.standard_normal((40, 2048))
    mu, sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    rows = []
    for m, shift in (("a", 0.0), ("b", 1.0)):
        for g in (2.0, 7.0):
            for i in range(10):
                rows.append({"eval_model": m, "guidance_scale": g, "feature_error": None,
                             "clip_score": 20.0 + g + rng.normal(),
                             "inception": (rng.standard_normal(2048) + shift).astype(np.float32).tolist()})
    rows.append({"eval_model": "a", "guidance_scale": 2.0, "feature_error": "OSError: bad", "clip_score": None,
                 "inception": None})
    scores = pa.Table.from_pylist(rows)
    ref = ReferenceStats(mu, sigma, 40, "k", "u", False, features=ref_feats.astype(np.float32),
                         weights_sha256="ab" * 32, images="coco/val2017/", num_files=41)
    res = reduce_results(scores, ref, spec).to_pylist()
    assert [(r["model"], r["guidance_scale"], r["n"]) for r in res] == [("a", 2.0, 10), ("a", 7.0, 10),
                                                                        ("b", 2.0, 10), ("b", 7.0, 10)]
    assert all(r["clip_lo"] <= r["clip_score"] <= r["clip_hi"] for r in res)
    assert all(0 < r["fid_lo"] < r["fid"] < r["fid_hi"] and r["fid_se"] > 0 for r in res)
    assert res[2]["fid"] > res[0]["fid"] + 1000  # mean shift of 1 in 2048 dims: +2048
    # KID on the same features: m = min(1000, 10, 40) = 10; the shifted model is far from the reference
    assert all(r["kid_subset_size"] == 10 and r["kid_std"] > 0 for r in res)
    assert res[2]["kid"] > res[0]["kid"] + 10 * res[0]["kid_std"]
    # without reference features (a cache written before KID) KID is null, FID is not
    res_nokid = reduce_results(scores, ReferenceStats(mu, sigma, 40, "k", "u", True), spec).to_pylist()
    assert res_nokid[0]["kid"] is None and res_nokid[0]["fid"] == pytest.approx(res[0]["fid"])
    md = markdown_table(pa.Table.from_pylist(res))
    assert md.count("\n") == 6 and "| a | 2 | 10 |" in md and " ± " in md
    comp = _comparability_stub(spec, ref)
    assert comp["resize"] == "legacy_pytorch" and comp["inception_weights_sha256"] == "ab" * 32
    assert comp["generation"]["models"]["b"] == {"model": "tiny", "revision": None, "scheduler": "ddim",
                                                 "dtype": "auto"}  # until the images say which
    assert comp["reference"]["n"] == 40 and comp["n_generated_per_point"] == 10
    text = comparability_markdown(comp)
    for needle in ("N generated per point: 10", "coco/val2017/ (40 images used of 41", "`legacy_pytorch`",
                   "ab" * 32, "per-image clamp", "end-of-text token kept", "E[FID_N]", "ddim, auto"):
        assert needle in text, needle
    assert "resize legacy_pytorch" in comparability_caption(comp)
    png = pareto_plot(pa.Table.from_pylist(res), caption=comparability_caption(comp))
    assert Image.open(io.BytesIO(png)).size[0] > 1200  # two panels: FID and KID
    assert Image.open(io.BytesIO(pareto_plot(pa.Table.from_pylist(res_nokid)))).size[0] < 1000


def test_plot_bars_are_the_interval_ends_and_labels_alternate():
    from batch.eval.report import _label_offsets, interval_segments

    pts = [{"fid": 10.0, "fid_lo": 7.0, "fid_hi": 18.0}, {"fid": 5.0, "fid_lo": None, "fid_hi": None},
           {"fid": 4.0, "fid_lo": float("nan"), "fid_hi": 6.0}]
    assert interval_segments(pts, "fid_lo", "fid_hi") == ([0], [7.0], [18.0])  # asymmetric: 3 below, 8 above
    offs = _label_offsets(4)
    assert len(set(offs)) == 4 and offs[0] != _label_offsets(4, curve=1)[0]


def test_eval_state_tells_running_from_abandoned_and_status_prints_it(tmp_path, capsys):
    import os
    import socket
    import time

    from batch.cli import main
    from batch.eval.evaluation import ABANDONED_AFTER, EVAL_RECORD, RecordWriter, eval_state
    from batch.store.io import open_output

    now = time.time()
    alive = {"status": "running", "heartbeat": now - 5, "host": socket.gethostname(), "pid": os.getpid()}
    assert eval_state(alive, now) == "running"
    assert eval_state({**alive, "heartbeat": now - ABANDONED_AFTER - 1}, now) == "abandoned"
    assert eval_state({**alive, "pid": 2 ** 22 + 12345}, now) == "abandoned"  # no such process on this host
    assert eval_state({**alive, "status": "finished"}, now + 1e6) == "finished"

    out = open_output(str(tmp_path / "ev"))
    record = {"status": "running", "num_prompts": 4, "started_at": "t0", "timings": {}}
    writer = RecordWriter(out, record, interval=0.05)
    first = out.get_json(EVAL_RECORD)["heartbeat"]
    time.sleep(0.3)
    assert out.get_json(EVAL_RECORD)["heartbeat"] > first  # the thread keeps beating
    writer.stop()
    assert main(["status", str(tmp_path / "ev")]) == 0
    assert capsys.readouterr().out.startswith("evaluation: running, heartbeat")
    stale = {**out.get_json(EVAL_RECORD), "heartbeat": now - 3600}
    out.put_json(EVAL_RECORD, stale)  # what a killed driver leaves behind
    assert main(["status", str(tmp_path / "ev"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "abandoned"


def test_feature_stage_in_process_marks_unreadable_images(tmp_path):
    from batch.metrics.extract import FeatureExtractor
    from batch.metrics.tiny import save_random_inception, save_tiny_clip

    w = save_random_inception(tmp_path / "inc.pth")
    clip = save_tiny_clip(tmp_path / "clip")
    imgs = write_images(tmp_path / "img", 2)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    uris = [str(p) for p in sorted(imgs.glob("*.jpg"))] + [str(tmp_path / "img" / "broken.png")]
    batch = pa.table({"uri": uris, "prompt": ["a", "b", "c"]})
    out = FeatureExtractor(str(w), str(clip), reference=True, reference_size=64, batch_size=2)(batch).to_pylist()
    assert [r["feature_error"] is None for r in out] == [True, True, False]
    assert out[2]["feature_error"].startswith("uri: cannot read") and "broken.png" in out[2]["feature_error"]
    assert "UnidentifiedImageError" in out[2]["feature_error"]
    assert len(out[0]["inception"]) == 2048 and out[0]["inception"] != out[1]["inception"]
    assert 0 <= out[0]["clip_score"] <= 100 and out[2]["clip_score"] is None


def test_feature_stage_reads_images_inside_shards(tmp_path):
    """Generations stored as WebDataset/Parquet shards: ``uri`` is the shard, ``member`` the image in it."""
    from batch.metrics.extract import FeatureExtractor
    from batch.metrics.tiny import save_random_inception
    from batch.store.formats import build_parquet, build_webdataset

    w = save_random_inception(tmp_path / "inc.pth")
    rng = np.random.default_rng(0)
    pngs = [encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), OutputFormat()) for _ in range(2)]
    samples = [(f"k{i}", {"id": f"r{i}", "image_index": 0, "width": 32, "height": 32, "prompt": "p"}, d)
               for i, d in enumerate(pngs)]
    (tmp_path / "s.tar").write_bytes(build_webdataset(samples, "png"))
    (tmp_path / "s.parquet").write_bytes(build_parquet(samples, "png"))
    (tmp_path / "plain.png").write_bytes(pngs[1])
    batch = pa.table({"uri": [str(tmp_path / "s.tar"), str(tmp_path / "s.parquet"), str(tmp_path / "plain.png")],
                      "member": ["k1.png", "k1", None]})
    out = FeatureExtractor(str(w), batch_size=3)(batch).to_pylist()
    assert [r["feature_error"] for r in out] == [None, None, None]
    assert out[0]["inception"] == out[1]["inception"] == out[2]["inception"]  # the same image, three ways


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    from batch.metrics.tiny import save_random_inception, save_tiny_clip

    d = tmp_path_factory.mktemp("evaldemo")
    return {"captions": str(write_coco(d / "captions.json")), "images": str(write_images(d / "images", 4)),
            "weights": str(save_random_inception(d / "inc.pth")), "clip": str(save_tiny_clip(d / "clip")),
            "root": d}


@pytest.mark.e2e
def test_eval_end_to_end_with_cached_reference_stats(demo_inputs, ray_session, capsys):
    from batch.cli import main

    d = demo_inputs["root"]
    common = ["--set", f"fid.weights={demo_inputs['weights']}", "--set", f"clip.model={demo_inputs['clip']}",
              "--set", "fid.reference_size=64"]
    # 1. reference statistics computed once ...
    assert main(["fid-stats", demo_inputs["images"], "--output", str(d / "stats"), "--config",
                 str(ROOT / "configs/eval-pareto-tiny.yaml"), "--quiet", *common]) == 0
    assert "computed reference statistics of 4 images" in capsys.readouterr().out
    (npz,) = (d / "stats").glob("*.npz")
    mtime = npz.stat().st_mtime_ns
    # 2. ... and reused by the evaluation (one model, 3 scales, 2 prompts)
    out = d / "eval"
    rc = main(["eval", str(ROOT / "configs/eval-pareto-tiny.yaml"), "--coco-captions", demo_inputs["captions"],
               "--coco-images", demo_inputs["images"], "--output", str(out), "--limit", "2", "--fid-stats",
               str(d / "stats"), "--quiet", *common, "--set", 'models=[{"name": "tiny", "model": "tiny"}]'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "(cached)" in printed and "| tiny | 1.5 | 2 |" in printed
    assert npz.stat().st_mtime_ns == mtime
    # 3. a second fid-stats run reuses the cache without recomputing
    assert main(["fid-stats", demo_inputs["images"], "--output", str(d / "stats"), "--config",
                 str(ROOT / "configs/eval-pareto-tiny.yaml"), "--quiet", *common]) == 0
    assert "reused cached reference statistics of 4 images" in capsys.readouterr().out
    assert npz.stat().st_mtime_ns == mtime

    res = json.loads((out / "results.json").read_text())
    rows = res["results"]
    assert [(r["model"], r["guidance_scale"], r["n"]) for r in rows] == [("tiny", 1.5, 2), ("tiny", 4.0, 2),
                                                                         ("tiny", 8.0, 2)]
    assert all(r["fid"] > 0 and 0 <= r["clip_score"] <= 100 for r in rows)
    assert all(r["clip_lo"] <= r["clip_score"] <= r["clip_hi"] for r in rows)
    assert all(r["kid"] is not None and r["kid_subset_size"] == 2 for r in rows)  # m = min(1000, 2, 4)
    assert res["comparability"]["n_generated_per_point"] == 2 and res["comparability"]["reference"]["n"] == 4
    assert pq.read_table(out / "results.parquet").num_rows == 3
    assert Image.open(out / "pareto.png").size[0] > 100
    record = json.loads((out / "eval.json").read_text())
    assert record["status"] == "finished" and record["reference"]["cached"] is True
    assert record["comparability"] == res["comparability"] and record["heartbeat"] > 0
    assert res["comparability"]["generation"]["models"]["tiny"]["dtype"] == "float32"  # from the metadata
    assert "Comparable only with" in (out / "results.md").read_text()
    assert "| tiny | 4 | 2 |" in record["table_markdown"]
    assert (out / "results.md").read_text() == record["table_markdown"]
    # generation went through the ordinary job: paired seeds across scales, guidance per row, images kept
    from batch.store.commit import read_metadata

    meta = read_metadata(str(out / "generations" / "tiny")).to_pylist()
    assert len(meta) == 6 and all(r["status"] == "ok" for r in meta)
    by_prompt = {}
    for r in meta:
        by_prompt.setdefault(r["coco_annotation_id"], set()).add((r["seed"], r["prompt"]))
    assert len(by_prompt) == 2 and all(len(v) == 1 for v in by_prompt.values())
    scores = pq.read_table(out / "scores" / "tiny.parquet")
    assert scores.num_rows == 6 and scores.column("clip_score").null_count == 0

    # metrics can be recomputed from the stored images: a rerun reuses the finished generation ...
    eval_args = ["eval", str(ROOT / "configs/eval-pareto-tiny.yaml"), "--coco-captions", demo_inputs["captions"],
                 "--coco-images", demo_inputs["images"], "--output", str(out), "--fid-stats", str(d / "stats"),
                 "--quiet", *common, "--set", 'models=[{"name": "tiny", "model": "tiny"}]']
    assert main([*eval_args, "--limit", "2"]) == 2  # a finished evaluation is never overwritten
    (out / "eval.json").write_text(json.dumps({**record, "status": "crashed"}))
    assert main([*eval_args, "--limit", "1"]) == 2  # ... but only for the same prompts, seeds and scales
    assert "different prompt sample" in capsys.readouterr().err
    assert main([*eval_args, "--limit", "2"]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["reused_generations"] == ["tiny"] and again["generations"]["tiny"]["images_generated_now"] == 0
    assert [r["fid"] for r in again["results"]] == pytest.approx([r["fid"] for r in rows], rel=1e-6)


def test_jobs_evaluate_maps_config_flag():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_evaluate", ROOT / "jobs/evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._argv(["--config", "c.yaml", "--limit", "5"]) == ["eval", "c.yaml", "--limit", "5"]
    assert mod._argv(["--config=c.yaml", "--output", "o"]) == ["eval", "c.yaml", "--output", "o"]
    assert mod._argv(["c.yaml"]) == ["eval", "c.yaml"]


@pytest.mark.e2e
def test_failed_eval_says_so_in_its_record(tmp_path, ray_session):
    from batch.eval.evaluation import run_eval

    spec = EvalSpec(models=[{"name": "tiny", "model": "tiny"}], num_prompts=2, progress=False)
    with pytest.raises(SpecError, match="not a folder"):
        run_eval(spec, str(write_coco(tmp_path / "c.json")), str(tmp_path / "no-images"), str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["status"] == "crashed" and "not a folder" in record["error"]
    assert pq.read_table(tmp_path / "out" / "prompts.parquet").num_rows == 2


def test_fid_stats_set_reaches_statistics_without_a_config(tmp_path, monkeypatch, capsys):
    """``--set`` applies to ``sdbatch fid-stats`` with no ``--config`` (storage options, fid.*)."""
    import batch.metrics.reference as ev
    from batch.cli import main

    seen = {}

    def fake(images_uri, spec, cache=None):
        seen["spec"] = spec
        return ReferenceStats(np.zeros(2), np.eye(2), 2, "k", f"{cache}/k.npz", cached=True)

    monkeypatch.setattr(ev, "reference_statistics", fake)
    assert main(["fid-stats", "memory://imgs", "--output", str(tmp_path), "--quiet",
                 "--set", "storage_options.anon=true", "--set", "fid.reference_size=64"]) == 0
    assert seen["spec"].storage_options == {"anon": True}
    assert seen["spec"].fid.reference_size == 64 and seen["spec"].progress is False
    assert main(["fid-stats", "memory://imgs", "--output", str(tmp_path), "--set", "fid.nope=1"]) == 2
    assert "fid.nope" in capsys.readouterr().err


def test_feature_stage_refuses_an_empty_table():
    from batch.metrics.reference import ScoringError
    from batch.metrics.reference import score_images as _run_features

    spec = EvalSpec(models=[{"name": "tiny", "model": "tiny"}], progress=False)
    with pytest.raises(ScoringError, match="no images to score"):
        _run_features(pa.table({"uri": pa.array([], pa.string())}), {}, spec, desc="features")


@pytest.fixture(scope="module")
def failing_eval(demo_inputs):
    """Eval CLI arguments whose generations fail every row at planning (prompts over max_prompt_chars), with the
    reference statistics cached beforehand."""
    from batch.cli import main

    d = demo_inputs["root"]
    common = ["--set", f"fid.weights={demo_inputs['weights']}", "--set", f"clip.model={demo_inputs['clip']}",
              "--set", "fid.reference_size=64", "--quiet"]
    stats = str(d / "stats-failing")

    def args(out, *extra):
        return ["eval", str(ROOT / "configs/eval-pareto-tiny.yaml"), "--coco-captions", demo_inputs["captions"],
                "--coco-images", demo_inputs["images"], "--output", str(out), "--limit", "2", "--fid-stats", stats,
                *common, "--set", 'models=[{"name": "tiny", "model": "tiny"}]',
                "--set", "generation.limits.max_prompt_chars=1", *extra]
    return main, args, stats, common


@pytest.mark.e2e
def test_eval_stops_when_a_generation_exceeds_max_failed_fraction(failing_eval, demo_inputs, ray_session, capsys):
    main, args, stats, common = failing_eval
    out = demo_inputs["root"] / "eval-genfail"
    assert main(args(out)) == 2
    err = capsys.readouterr().err
    assert "generation of model 'tiny' failed" in err and "max_failed_fraction" in err
    record = json.loads((out / "eval.json").read_text())
    assert record["status"] == "failed" and "max_failed_fraction" in record["error"]
    assert record["generations"]["tiny"]["rows_failed"] == 6
    assert not (out / "results.json").exists() and not (out / "scores").exists()


@pytest.mark.e2e
def test_eval_with_no_images_to_score_says_so(failing_eval, demo_inputs, ray_session, capsys):
    main, args, stats, common = failing_eval
    out = demo_inputs["root"] / "eval-noimages"
    assert main(args(out, "--set", "generation.max_failed_fraction=1")) == 2
    err = capsys.readouterr().err
    assert "no images to score" in err and "ArrowInvalid" not in err
    record = json.loads((out / "eval.json").read_text())
    assert record["status"] == "failed" and "no images to score" in record["error"]

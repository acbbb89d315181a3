"""JobSpec validation, YAML loading and command-line overrides (no Ray, no model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from batch.spec.base import MAX_SEED, SCHEDULER_NAMES, Limits, SpecError
from batch.spec.config import JobSpec, apply_overrides, load_spec, parse_set_option, parse_spec
from batch.tasks.txt2img import Txt2ImgDefaults

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
                 if not p.name.startswith("eval-"))  # evaluation specs: tests/test_evaluation.py


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


# --- defaults ---------------------------------------------------------------------------------------------


def test_defaults_from_empty_dict():
    spec = parse_spec({})
    assert spec.task == "txt2img"
    assert spec.model == "tiny"
    assert spec.revision is None
    assert spec.dtype == "auto" and spec.device == "auto"
    assert spec.allow_pickle is False
    assert spec.batch_size == 4
    assert spec.actors == "auto"
    assert spec.seed == 0
    assert spec.max_failed_fraction == 0.0
    assert spec.storage_options == {}
    d = spec.defaults
    assert (d.negative_prompt, d.guidance_scale, d.num_inference_steps) == (None, 7.5, 50)
    assert (d.height, d.width, d.num_images, d.scheduler) == (512, 512, 1, "model")
    lim = spec.limits
    assert (lim.max_images_per_row, lim.max_side, lim.max_prompt_chars) == (16, 2048, 10_000)


def test_load_spec_none_gives_defaults():
    assert load_spec(None) == JobSpec()


def test_load_spec_empty_file_gives_defaults(tmp_path):
    assert load_spec(_write(tmp_path, "")) == JobSpec()


def test_load_spec_reads_yaml_and_keeps_unset_defaults(tmp_path):
    path = _write(tmp_path, "model: org/name\nbatch_size: 2\ndefaults:\n  height: 64\n  scheduler: euler_a\n")
    spec = load_spec(path)
    assert spec.model == "org/name"
    assert spec.batch_size == 2
    assert spec.defaults.height == 64
    assert spec.defaults.scheduler == "euler_a"
    assert spec.defaults.width == 512  # untouched sibling keeps its default
    assert spec.limits == Limits()


def test_separate_specs_do_not_share_mutable_defaults():
    a, b = parse_spec({}), parse_spec({})
    a.storage_options["x"] = 1
    assert b.storage_options == {}
    assert a.defaults is not b.defaults


# --- unknown keys -----------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_field_and_lists_allowed(tmp_path):
    path = _write(tmp_path, "modle: tiny\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "modle: unknown field" in msg
    for name in JobSpec.model_fields:
        assert name in msg


def test_unknown_key_inside_defaults_names_dotted_field_and_lists_allowed():
    msg = _error({"defaults": {"heigth": 64}})
    assert "defaults.heigth: unknown field" in msg
    allowed = msg.split("allowed here:", 1)[1]
    for name in Txt2ImgDefaults.model_fields:
        assert (name in allowed) == (name != "task")  # ``task`` inside defaults is the spec's own task
    assert "batch_size" not in allowed  # the list is the nested model's keys, not the top level's


def test_unknown_key_inside_limits_names_dotted_field():
    msg = _error({"limits": {"max_sides": 64}})
    assert "limits.max_sides: unknown field" in msg
    for name in Limits.model_fields:
        assert name in msg


def test_every_bad_field_is_reported():
    msg = _error({"dtype": "fp64", "batch_size": 0, "bogus": 1})
    assert "dtype:" in msg and "batch_size:" in msg and "bogus:" in msg


# --- literals ---------------------------------------------------------------------------------------------


def test_bad_dtype_literal_names_field_and_allowed_values(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, "dtype: fp64\n"))
    msg = str(info.value)
    assert "dtype:" in msg
    assert "'fp64'" in msg
    for allowed in ("auto", "float32", "float16", "bfloat16"):
        assert f"'{allowed}'" in msg


def test_bad_scheduler_literal_lists_every_scheduler():
    msg = _error({"defaults": {"scheduler": "heun"}})
    assert "defaults.scheduler:" in msg and "'heun'" in msg
    for name in ("model", *SCHEDULER_NAMES):
        assert f"'{name}'" in msg


def test_bad_device_and_task_literals():
    assert "device:" in _error({"device": "tpu"})
    assert "task:" in _error({"task": "img2img"})


@pytest.mark.parametrize("name", ["model", *SCHEDULER_NAMES])
def test_every_scheduler_name_is_accepted(name):
    assert parse_spec({"defaults": {"scheduler": name}}).defaults.scheduler == name


# --- numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"defaults": {"height": 500}}, "defaults.height"),
        ({"defaults": {"width": 4}}, "defaults.width"),
        ({"defaults": {"guidance_scale": float("nan")}}, "defaults.guidance_scale"),
        ({"defaults": {"guidance_scale": float("inf")}}, "defaults.guidance_scale"),
        ({"defaults": {"guidance_scale": 0}}, "defaults.guidance_scale"),
        ({"defaults": {"num_inference_steps": 0}}, "defaults.num_inference_steps"),
        ({"defaults": {"num_inference_steps": 1001}}, "defaults.num_inference_steps"),
        ({"defaults": {"num_images": 0}}, "defaults.num_images"),
        ({"limits": {"max_side": 4}}, "limits.max_side"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED}, "seed"),
        ({"max_failed_fraction": 1.5}, "max_failed_fraction"),
        ({"actors": 0}, "actors"),
        ({"commit_every": 0}, "commit_every"),
        ({"writer_cpus": 0}, "writer_cpus"),
    ],
)
def test_bad_numbers_name_the_field(data, field):
    msg = _error(data)
    assert f"\n  {field}" in msg


def test_multiple_of_8_message():
    msg = _error({"defaults": {"height": 500}})
    assert "defaults.height" in msg and "multiple of 8" in msg and "500" in msg


def test_nan_guidance_from_yaml_file(tmp_path):
    with pytest.raises(SpecError, match=r"defaults\.guidance_scale"):
        load_spec(_write(tmp_path, "defaults:\n  guidance_scale: .nan\n"))


def test_edge_values_accepted():
    spec = parse_spec({"seed": MAX_SEED - 1, "actors": 3, "defaults": {"height": 8, "guidance_scale": 0.5},
                       "max_failed_fraction": 1})
    assert spec.seed == MAX_SEED - 1
    assert spec.actors == 3
    assert spec.defaults.height == 8
    assert math.isclose(spec.defaults.guidance_scale, 0.5)


# --- file errors ------------------------------------------------------------------------------------------


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(_write(tmp_path, "defaults: [unclosed\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(SpecError, match="mapping"):
        load_spec(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(SpecError, match="mapping"):
        parse_spec(["model", "tiny"])  # type: ignore[arg-type]


# --- overrides --------------------------------------------------------------------------------------------


def test_apply_overrides_dotted_keys_copy_and_null():
    data = {"model": "tiny", "defaults": {"height": 64, "width": 64}}
    out = apply_overrides(data, {"defaults.height": 128, "batch_size": 2, "limits.max_side": 256, "seed": None})
    assert out == {"model": "tiny", "defaults": {"height": 128, "width": 64}, "batch_size": 2,
                   "limits": {"max_side": 256}, "seed": None}
    assert data == {"model": "tiny", "defaults": {"height": 64, "width": 64}}  # input untouched


def test_apply_overrides_does_not_alias_nested_input():
    data = {"defaults": {"height": 64}}
    out = apply_overrides(data, {})
    out["defaults"]["height"] = 8
    assert data["defaults"]["height"] == 64


def test_apply_overrides_through_a_scalar_fails():
    with pytest.raises(SpecError, match="defaults"):
        apply_overrides({"defaults": 5}, {"defaults.height": 64})


def test_load_spec_applies_overrides_over_file(tmp_path):
    path = _write(tmp_path, "batch_size: 8\ndefaults:\n  height: 64\n  width: 64\n")
    spec = load_spec(path, {"batch_size": 2, "defaults.width": 128, "model": "org/x"})
    assert spec.batch_size == 2
    assert spec.defaults.width == 128
    assert spec.defaults.height == 64
    assert spec.model == "org/x"


def test_bad_override_is_reported_with_dotted_name(tmp_path):
    with pytest.raises(SpecError, match=r"defaults\.height"):
        load_spec(_write(tmp_path, "defaults:\n  height: 64\n"), {"defaults.height": 63})
    with pytest.raises(SpecError, match=r"defaults\.hieght: unknown field"):
        load_spec(None, {"defaults.hieght": 64})


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("defaults.height=64", "defaults.height", 64),
        ("defaults.guidance_scale=5.5", "defaults.guidance_scale", 5.5),
        ("progress=false", "progress", False),
        ("allow_pickle=true", "allow_pickle", True),
        ("revision=null", "revision", None),
        ("model=org/name", "model", "org/name"),
        (" run_id = abc ", "run_id", "abc"),
        ("defaults.negative_prompt=a=b", "defaults.negative_prompt", "a=b"),
        ("storage_options={anon: true}", "storage_options", {"anon": True}),
        ("seed=12", "seed", 12),
        ("revision='123'", "revision", "123"),
    ],
)
def test_parse_set_option_yaml_typed(text, key, value):
    k, v = parse_set_option(text)
    assert k == key
    assert v == value and type(v) is type(value)


def test_parse_set_option_requires_equals():
    with pytest.raises(SpecError, match="key=value"):
        parse_set_option("defaults.height")


def test_set_options_end_to_end(tmp_path):
    path = _write(tmp_path, "defaults:\n  height: 64\n")
    overrides = dict(parse_set_option(t) for t in ("defaults.height=128", "progress=false", "seed=7"))
    spec = load_spec(path, overrides)
    assert spec.defaults.height == 128 and spec.progress is False and spec.seed == 7


def test_set_option_null_resets_a_spec_value(tmp_path):
    """``--set revision=null`` resets a revision the YAML sets (parse_set_option documents null)."""
    path = _write(tmp_path, "model: org/name\nrevision: abc123\n")
    key, value = parse_set_option("revision=null")
    spec = load_spec(path, {key: value})
    assert spec.revision is None


# --- shipped configs --------------------------------------------------------------------------------------


# Every job spec shipped under configs/ (eval-*.yaml are evaluation specs). A config added, renamed or lost
# fails here until this list is updated, so each one is known to be loaded by the test below.
SHIPPED_CONFIGS = {"demo.yaml", "demo-upscale.yaml", "demo-variation.yaml", "nightly-sd14.yaml",
                   "serve-demo.yaml", "serve-sd21.yaml", "txt2img-sd14.yaml", "txt2img-sd21.yaml", "upscale-x4.yaml",
                   "variations.yaml"}


def test_configs_exist():
    assert {p.name for p in CONFIGS} == SHIPPED_CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    spec = load_spec(path)
    raw = yaml.safe_load(path.read_text())
    assert spec.model == raw["model"]
    assert all(getattr(spec.defaults, k) == v for k, v in raw["defaults"].items())
    assert spec.task == raw.get("task", "txt2img")


@pytest.mark.parametrize("text", ["[]\n", "false\n", "0\n", "- a\n- b\n"])
def test_spec_file_that_is_not_a_mapping_fails(tmp_path, text):
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(_write(tmp_path, text))


def test_empty_spec_file_is_the_defaults(tmp_path):
    assert load_spec(_write(tmp_path, "")) == parse_spec({})

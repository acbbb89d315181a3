"""``sdbatch`` command line: run, validate, make-tiny-model, eval, fid-stats."""

from __future__ import annotations

import argparse
import json
import sys

from batch.config import SpecError, load_spec, parse_set_option


def _spec_from_args(args: argparse.Namespace):
    overrides = {
        "manifest": getattr(args, "manifest", None),
        "output": getattr(args, "output", None),
        "model": getattr(args, "model", None),
        "run_id": getattr(args, "run_id", None),
        "seed": getattr(args, "seed", None),
        "batch_size": getattr(args, "batch_size", None),
        "actors": getattr(args, "actors", None),
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}  # flags not given
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    for text in getattr(args, "set", None) or []:
        key, value = parse_set_option(text)
        overrides[key] = value
    return load_spec(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from batch.job import run_job

    summary = run_job(_spec_from_args(args))
    print(summary.text())
    return summary.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from batch.manifest import plan, read_manifest
    from batch.storage import RESERVED_COLUMNS

    if args.task != "txt2img":
        raise SpecError(f"--task must be 'txt2img', got {args.task!r}")
    spec = _spec_from_args(args)
    p = plan(read_manifest(args.manifest, spec.storage_options), spec, RESERVED_COLUMNS)
    for r in p.failed.select(["manifest_row", "id", "error"]).to_pylist():
        print(f"row {r['manifest_row']} (id {r['id']!r}): {r['error']}")
    reasons = p.failure_reasons()
    report = {"rows": p.num_rows, "rows_ok": p.num_ok_rows, "rows_failed": p.failed.num_rows,
              "images": p.items.num_rows, "carried_columns": p.carried, "failure_reasons": dict(reasons)}
    print(json.dumps(report, indent=2))
    return 0 if p.failed.num_rows == 0 else 1


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from batch.tiny import save_tiny_model

    path = save_tiny_model(args.directory, task=args.task, prediction_type=args.prediction_type)
    print(f"wrote tiny {args.task} model ({args.prediction_type}) to {path}")
    return 0


def _eval_spec_from_args(args: argparse.Namespace):
    from batch.evaluation import load_eval_spec

    overrides = {}
    if getattr(args, "quiet", False):
        overrides["progress"] = False
    for text in getattr(args, "set", None) or []:
        key, value = parse_set_option(text)
        overrides[key] = value
    return load_eval_spec(args.config, overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from batch.evaluation import run_eval

    try:
        result = run_eval(_eval_spec_from_args(args), args.coco_captions, args.coco_images, args.output,
                          limit=args.limit, stats_cache=args.fid_stats)
    except FileNotFoundError as err:  # weights or model files: a usage error, not a crash
        raise SpecError(str(err)) from None
    ref = result.reference
    print(f"reference statistics: {ref.n} images, key {ref.key} ({'cached' if ref.cached else 'computed'})")
    print(result.table_md)
    print(f"wrote results.parquet, results.json, results.md, pareto.png, eval.json under {result.output} "
          f"in {result.seconds:.1f}s")
    return 0


def cmd_fid_stats(args: argparse.Namespace) -> int:
    from batch.evaluation import StatsSpec, reference_statistics

    spec = _eval_spec_from_args(args) if args.config else StatsSpec()
    spec = StatsSpec(fid=spec.fid, features=spec.features, storage_options=spec.storage_options,
                     ray_address=spec.ray_address, progress=not args.quiet)
    if args.weights:
        spec.fid.weights = args.weights
    try:
        ref = reference_statistics(args.images, spec, args.output)
    except FileNotFoundError as err:
        raise SpecError(str(err)) from None
    print(f"{'reused cached' if ref.cached else 'computed'} reference statistics of {ref.n} images: {ref.uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbatch", description="Batch Stable Diffusion generation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p: argparse.ArgumentParser, config_required: bool) -> None:
        p.add_argument("config", nargs=None if config_required else "?", help="YAML job spec (configs/*.yaml)")
        p.add_argument("--model", help="'tiny', a local diffusers folder, or a hub id")
        p.add_argument("--seed", type=int, help="run seed")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any spec field, e.g. --set defaults.guidance_scale=5 (repeatable)")

    run = sub.add_parser("run", help="run a batch job")
    spec_args(run, True)
    run.add_argument("--manifest", help="Parquet manifest URI")
    run.add_argument("--output", help="output prefix URI")
    run.add_argument("--run-id")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--actors", type=int)
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a manifest (schema and every row); loads no model")
    val.add_argument("manifest", help="Parquet manifest URI")
    val.add_argument("--task", default="txt2img")
    val.add_argument("--config", help="job spec whose defaults and limits apply")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight diffusers model folder")
    tiny.add_argument("directory")
    tiny.add_argument("--task", default="txt2img", choices=["txt2img"])
    tiny.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    tiny.set_defaults(func=cmd_make_tiny_model)

    ev = sub.add_parser("eval", help="guidance-scale Pareto evaluation: FID and CLIP score on COCO prompts")
    ev.add_argument("config", help="evaluation spec (configs/eval-pareto-*.yaml)")
    ev.add_argument("--coco-captions", required=True, help="COCO captions_*.json (fsspec URI)")
    ev.add_argument("--coco-images", required=True, help="folder of COCO reference images (fsspec URI)")
    ev.add_argument("--output", required=True, help="output prefix URI")
    ev.add_argument("--limit", type=int, help="use only this many prompts (a quick look)")
    ev.add_argument("--fid-stats", help="reference statistics cache (default: fid.stats_cache, else "
                    "~/.cache/sdbatch/fid-stats)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any evaluation spec field, e.g. --set fid.bootstrap=10 (repeatable)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    fs = sub.add_parser("fid-stats", help="compute (or reuse) cached FID reference statistics of a folder of images")
    fs.add_argument("images", help="folder of reference images (fsspec URI)")
    fs.add_argument("--output", required=True, help="statistics cache folder/prefix (fsspec URI)")
    fs.add_argument("--config", help="evaluation spec whose fid.* and features.* settings apply")
    fs.add_argument("--weights", help="FID Inception weights path or URL (overrides fid.weights)")
    fs.add_argument("--set", action="append", metavar="KEY=VALUE")
    fs.add_argument("--quiet", action="store_true")
    fs.set_defaults(func=cmd_fid_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from batch.job import RunExistsError
    from batch.manifest import ManifestError
    from batch.models import ModelError

    try:
        return args.func(args)
    except (SpecError, ManifestError, ModelError, RunExistsError) as err:
        print(f"sdbatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``sdbatch`` command line: run, resume, retry-failed, status, compact, validate, grid, make-tiny-model, eval,
fid-stats, serve."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from batch.spec.base import SpecError
from batch.spec.config import apply_overrides, load_spec, parse_set_option, parse_spec
from batch.tasks import TASKS


def _spec_from_args(args: argparse.Namespace):
    overrides = {
        "manifest": _manifest_arg(getattr(args, "manifest", None)),
        "output": getattr(args, "output", None),
        "model": getattr(args, "model", None),
        "run_id": getattr(args, "run_id", None),
        "date": getattr(args, "date", None),
        "seed": getattr(args, "seed", None),
        "batch_size": getattr(args, "batch_size", None),
        "actors": getattr(args, "actors", None),
        "dtype": getattr(args, "dtype", None),
        "task": getattr(args, "task", None) if getattr(args, "command", None) == "validate" else None,
        "shared_paths": getattr(args, "shared_path", None),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}  # flags not given
    overrides |= _device_overrides(getattr(args, "device", None))
    return load_spec(args.config, overrides | _quiet_and_set_overrides(args))


def _manifest_arg(uris: list[str] | None) -> str | list[str] | None:
    """``--manifest`` given once: that URI; several times: the list, read in order."""
    if not uris:
        return None
    return uris[0] if len(uris) == 1 else list(uris)


def _device_overrides(device: str | None) -> dict:
    """``--device``; ``--device cpu`` makes the run a CPU run, so it also clears the spec's ``gpus_per_actor``
    (the shipped GPU configs set it to 1, and a CPU run requests no GPUs from Ray)."""
    if device is None:
        return {}
    return {"device": device} | ({"gpus_per_actor": None} if device == "cpu" else {})


def cmd_run(args: argparse.Namespace) -> int:
    from batch.run.job import run_job

    summary = run_job(_spec_from_args(args), mode="extend" if args.extend else "run", force=args.force)
    print(summary.text())
    args.summary = summary
    return summary.exit_code


def _set_overrides(args: argparse.Namespace) -> dict:
    return dict(parse_set_option(t) for t in getattr(args, "set", None) or [])


def _quiet_and_set_overrides(args: argparse.Namespace) -> dict:
    """``--quiet`` (progress off), then every ``--set key=value`` in order (a later one wins)."""
    return ({"progress": False} if getattr(args, "quiet", False) else {}) | _set_overrides(args)


def _open_run(args: argparse.Namespace):
    """The output prefix named on the command line (``--set storage_options.x=...`` opens it)."""
    from batch.store.commit import RUN_RECORD
    from batch.store.io import open_output

    options = apply_overrides({}, _set_overrides(args)).get("storage_options") or {}
    out = open_output(args.output, options)
    if not out.exists(RUN_RECORD):
        raise SpecError(f"{args.output} holds no run ({RUN_RECORD} not found)")
    return out


def _recorded_spec(args: argparse.Namespace):
    """The spec a run was started with (from its ``run.json``), with this command's overrides applied.

    Secrets were redacted when recorded (``***``); they are dropped here, so credentials come from the
    environment or from ``--set storage_options.key=...`` again.
    """
    from batch.store.commit import RUN_RECORD

    data = _open_run(args).get_json(RUN_RECORD)["spec"]
    data["storage_options"] = {k: v for k, v in data.get("storage_options", {}).items() if v != "***"}
    data["output"] = args.output
    flags = {"actors": args.actors, "batch_size": args.batch_size, "progress": False if args.quiet else None}
    overrides = {k: v for k, v in flags.items() if v is not None} | _device_overrides(args.device)
    overrides |= _set_overrides(args)
    return parse_spec(apply_overrides(data, overrides), f"{args.output}/{RUN_RECORD}")


def cmd_resume(args: argparse.Namespace) -> int:
    from batch.run.job import run_job

    summary = run_job(_recorded_spec(args), mode="retry_failed" if args.command == "retry-failed" else "run",
                      force=args.force)
    print(summary.text())
    args.summary = summary
    return summary.exit_code


def _eval_status(out, args: argparse.Namespace) -> int:
    """``sdbatch status`` of an evaluation output (``eval.json``): its state (running / abandoned / finished /
    failed / crashed), heartbeat age, and its generations' progress."""
    from batch.eval.evaluation import EVAL_RECORD, eval_state

    record = out.get_json(EVAL_RECORD)
    state = eval_state(record)
    beat = record.get("heartbeat")
    report = {"kind": "evaluation", "status": state, "recorded_status": record.get("status"),
              "heartbeat_age_s": None if beat is None else round(time.time() - float(beat), 1),
              "host": record.get("host"), "pid": record.get("pid"), "started_at": record.get("started_at"),
              "num_prompts": record.get("num_prompts"), "error": record.get("error"),
              "generations": record.get("generations", {}), "timings": record.get("timings", {})}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    age = ("" if beat is None else
           f", heartbeat {report['heartbeat_age_s']:.0f}s ago ({record.get('host')} pid {record.get('pid')})")
    print(f"evaluation: {state}{age}, {report['num_prompts']} prompts, started {report['started_at']}")
    if state == "abandoned":
        print("  the driver stopped beating without writing a final status (killed?); run the same "
              "`sdbatch eval` again with this output: finished generations are reused, interrupted ones resume")
    for name, g in report["generations"].items():
        print(f"  generation {name}: {g.get('images_ok')} images ok, {g.get('rows_failed')} rows failed "
              f"({g.get('output')})")
    if record.get("error"):
        print(f"  error: {record['error']}")
    if state == "finished" and record.get("table_markdown"):
        print(record["table_markdown"].split("\n\n")[0])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from batch.eval.evaluation import EVAL_RECORD
    from batch.plan.manifest import failure_reason
    from batch.store.commit import LEASE, LEASE_SECONDS, RUN_RECORD, SUCCESS_MARKER, metadata_parts
    from batch.store.done import DoneIndex
    from batch.store.io import open_output

    options = apply_overrides({}, _set_overrides(args)).get("storage_options") or {}
    probe = open_output(args.output, options)
    if not probe.exists(RUN_RECORD) and probe.exists(EVAL_RECORD):
        return _eval_status(probe, args)
    out = _open_run(args)
    record = out.get_json(RUN_RECORD)
    # key columns only, one part at a time: bounded memory on a 10M-row output (batch.store.done)
    counts = DoneIndex.read(out).tally(out, record.get("rows", 0), record.get("images_planned") or 0, failure_reason)
    if record.get("images_planned") is None:  # the plan streams: its total is known once an attempt finishes it
        counts["images_pending"] = None
    report = {"run_id": record.get("run_id"), "status": record.get("status"),
              "complete": out.exists(SUCCESS_MARKER), "attempts": len(record.get("attempts", [])),
              "metadata_parts": len(metadata_parts(out)), **counts}
    if out.exists(LEASE):
        report["lease"] = out.get_json(LEASE)
    if report["status"] == "running":  # a driver killed with SIGKILL cannot say so: its heartbeat tells
        lease = report.get("lease") or {}
        age = time.time() - float(lease.get("heartbeat", 0))
        if lease.get("released") or age > LEASE_SECONDS:
            report["status"] = f"abandoned (no driver: last heartbeat {age:.0f}s ago); sdbatch resume finishes it"
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"run {report['run_id']}: {report['status']}{' (complete)' if report['complete'] else ''}, "
          f"{report['attempts']} attempt(s), {report['metadata_parts']} metadata part(s)")
    reused = f"{counts['images_reused']} reused from earlier runs (status skipped), " if counts["images_reused"] else ""
    pending = "unknown (the first attempt is still planning)" if counts["images_pending"] is None \
        else counts["images_pending"]
    print(f"  images: {counts['images_ok']} done, {reused}{counts['images_failed']} failed, {pending} pending")
    print(f"  rows: {counts['rows_ok']} ok, {counts['rows_failed']} failed (of {counts['rows']})")
    for reason, n in sorted(counts["failure_reasons"].items(), key=lambda kv: -kv[1]):
        print(f"  failed x{n}: {reason}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from batch.store.commit import SUCCESS_MARKER, Lease, compact, new_attempt_id

    out = _open_run(args)
    if not out.exists(SUCCESS_MARKER) and not args.force:
        raise SpecError(f"{args.output} has not finished ({SUCCESS_MARKER} missing); compact after a clean finish")
    lease = Lease(out, new_attempt_id(), force=False)  # never under a live driver (RunInProgressError)
    try:
        before, after = compact(out)
    finally:
        lease.release()
    print(f"metadata parts: {before} -> {after}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Scan and plan the manifest chunk by chunk (as a job does: bounded memory, any size), print each failed
    row and a JSON report; exit 1 if a row is bad."""
    from collections import Counter

    from batch.plan.manifest import failure_reason, iter_plan, scan_manifest
    from batch.plan.sources import open_manifest
    from batch.store.schema import RESERVED_COLUMNS

    spec = _spec_from_args(args)  # --task, when given, overrides the config's task
    manifest = _manifest_arg(args.manifest)
    spec = spec.model_copy(update={"manifest": manifest})  # relative image URIs resolve against it
    source = open_manifest(manifest, spec.storage_options)
    scan = scan_manifest(source, spec, RESERVED_COLUMNS)
    os.unlink(scan.row_hashes)
    failed, images, reasons = 0, 0, Counter()
    for _, p in iter_plan(source.iter_batches(), spec, scan.carried, scan.duplicates):
        for r in p.failed.select(["manifest_row", "id", "error"]).to_pylist():
            print(f"row {r['manifest_row']} (id {r['id']!r}): {r['error']}")
            reasons[failure_reason(r["error"])] += 1
        failed += p.failed.num_rows
        images += p.items.num_rows
    report = {"rows": scan.rows, "rows_ok": scan.rows - failed, "rows_failed": failed,
              "images": images, "carried_columns": scan.carried, "failure_reasons": dict(reasons)}
    print(json.dumps(report, indent=2))
    return 0 if failed == 0 else 1


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from batch.models.load import save_tiny_model

    path = save_tiny_model(args.directory, task=args.task, prediction_type=args.prediction_type)
    kind = f" ({args.prediction_type})" if args.task == "txt2img" else ""
    print(f"wrote tiny {args.task} model{kind} to {path}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from batch.eval.grid import make_grid

    options = {}
    for key, value in _set_overrides(args).items():
        if not key.startswith("storage_options."):
            raise SpecError(f"grid --set takes storage_options.* only, got {key!r}")
        options[key.split(".", 1)[1]] = value
    try:
        layout, rows = make_grid(args.output, args.out, n=args.n, cell=args.cell, columns=args.columns,
                                 storage_options=options)
    except ValueError as err:
        raise SpecError(str(err)) from None
    print(f"wrote {args.out}: {len(rows)} images, {layout.columns}x{layout.rows} cells, {layout.size[0]}x"
          f"{layout.size[1]} px")
    return 0


def _eval_spec_from_args(args: argparse.Namespace):
    from batch.eval.spec import load_eval_spec

    return load_eval_spec(args.config, _quiet_and_set_overrides(args))


def cmd_eval(args: argparse.Namespace) -> int:
    from batch.eval.evaluation import run_eval
    from batch.metrics.reference import ScoringError

    try:
        result = run_eval(_eval_spec_from_args(args), args.coco_captions, args.coco_images, args.output,
                          limit=args.limit, stats_cache=args.fid_stats)
    except FileNotFoundError as err:  # weights or model files: a usage error, not a crash
        raise SpecError(str(err)) from None
    except ScoringError as err:  # a generation failed too much, or nothing to score: eval.json says "failed"
        print(f"sdbatch: error: {err}", file=sys.stderr)
        return 2
    ref = result.reference
    print(f"reference statistics: {ref.n} images, key {ref.key} ({'cached' if ref.cached else 'computed'})")
    print(result.table_md)
    print(f"wrote results.parquet, results.json, results.md, pareto.png, eval.json under {result.output} "
          f"in {result.seconds:.1f}s")
    return 0


def cmd_fid_stats(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from batch.metrics.settings import StatsSpec
    from batch.metrics.reference import reference_statistics

    if args.config:
        spec = _eval_spec_from_args(args)
    else:  # no config: --set still applies (storage_options.*, fid.*, features.*)
        try:
            spec = StatsSpec.model_validate(apply_overrides({}, _quiet_and_set_overrides(args)))
        except ValidationError as err:
            raise SpecError("invalid fid-stats settings (--set):\n" + "\n".join(
                f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())) from None
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


def cmd_serve(args: argparse.Namespace) -> int:
    """The real-time endpoint (README "Serving (real-time endpoint)"): runs until SIGTERM/SIGINT, then exits 0."""
    from batch.serve.app import serve_forever

    overrides = _set_overrides(args) | ({"ray_address": args.ray_address} if args.ray_address else {})
    return serve_forever(args.config, overrides, args.host, args.port)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdbatch")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbatch", description="Batch Stable Diffusion generation on Ray.")
    parser.add_argument("--version", action="version", version=f"sdbatch {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p: argparse.ArgumentParser, config_required: bool) -> None:
        p.add_argument("config", nargs=None if config_required else "?", help="YAML job spec (configs/*.yaml)")
        p.add_argument("--model", help="'tiny', a local diffusers folder, a hub id, or 'none' "
                                       "(dry run: seeded noise images, no model)")
        p.add_argument("--seed", type=int, help="run seed")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any spec field, e.g. --set defaults.guidance_scale=5 (repeatable)")

    run = sub.add_parser("run", help="run a batch job")
    spec_args(run, True)
    run.add_argument("--manifest", action="append", metavar="URI",
                     help="manifest: a Parquet/CSV/TSV/JSON Lines/catalogue .json file, folder or glob URI; "
                          "repeat the flag for several, read in order (README \"Manifest forms\")")
    run.add_argument("--output", help="output prefix URI")
    run.add_argument("--run-id")
    run.add_argument("--date", metavar="YYYY-MM-DD",
                     help="the run's day (spec date): recorded in run.json; with seed_per_day it decides the seeds")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--actors", type=int)
    run.add_argument("--device", choices=["auto", "cpu", "cuda"],
                     help="where the sampler computes; cpu also clears gpus_per_actor (no GPUs requested)")
    run.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--force", action="store_true", help="take over the run's lease even if it looks alive")
    run.add_argument("--extend", action="store_true",
                     help="the output holds a run whose manifest has since gained rows at its end: generate only "
                          "the new rows (rows the run had must be unchanged, else they are named and refused)")
    run.add_argument("--shared-path", action="append", metavar="PATH",
                     help="an absolute path every cluster node mounts; on a cluster, a local --manifest/--output "
                          "must lie under one (repeatable)")
    run.set_defaults(func=cmd_run)

    for name, help_ in (("resume", "finish an interrupted run: generate only what is not committed"),
                        ("retry-failed", "generate again only the images whose latest record failed")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("output", help="the run's output prefix")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--actors", type=int)
        p.add_argument("--device", choices=["auto", "cpu", "cuda"])
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--force", action="store_true", help="take over the run's lease even if it looks alive")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recorded spec field (e.g. storage_options.key=...)")
        p.set_defaults(func=cmd_resume)

    st = sub.add_parser("status", help="done / failed / pending counts and failure reasons of a run; the state "
                                       "(running / abandoned / finished / ...) of an evaluation output")
    st.add_argument("output")
    st.add_argument("--json", action="store_true")
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="storage_options.key=value")
    st.set_defaults(func=cmd_status)

    cp = sub.add_parser("compact", help="rewrite a finished run's metadata parts as a few files")
    cp.add_argument("output")
    cp.add_argument("--force", action="store_true", help="compact even if the run has not finished")
    cp.add_argument("--set", action="append", metavar="KEY=VALUE", help="storage_options.key=value")
    cp.set_defaults(func=cmd_compact)

    val = sub.add_parser("validate", help="check a manifest (schema and every row); loads no model")
    val.add_argument("manifest", nargs="+", help="manifest URI(s): file, folder or glob, read in order")
    val.add_argument("--task", choices=list(TASKS),
                     help="manifest kind (default: the config's task, else txt2img)")
    val.add_argument("--config", help="job spec whose defaults and limits apply")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    grid = sub.add_parser("grid", help="contact sheet (PNG) of a run's images with id/seed/prompt captions")
    grid.add_argument("output", help="the run's output prefix URI")
    grid.add_argument("--n", type=int, default=64, help="number of images (first by id, image index)")
    grid.add_argument("--out", default="grid.png", help="PNG to write (path or fsspec URI)")
    grid.add_argument("--cell", type=int, default=128, help="cell size in pixels (images are scaled to fit)")
    grid.add_argument("--columns", type=int, help="columns (default: near-square)")
    grid.add_argument("--set", action="append", metavar="storage_options.KEY=VALUE",
                      help="fsspec storage options for reading the run, e.g. --set storage_options.anon=true")
    grid.set_defaults(func=cmd_grid)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight diffusers model folder")
    tiny.add_argument("directory")
    tiny.add_argument("--task", default="txt2img", choices=list(TASKS),
                      help="which pipeline layout: txt2img, variation (image variations) or upscale (x4)")
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

    sv = sub.add_parser("serve", help="real-time endpoint on the batch job's sampler (Ray Serve): POST /generate, "
                                      "POST /score (catalogue form), GET /health, GET /ready; runs until SIGTERM")
    sv.add_argument("config", help="YAML job spec (path or fsspec URI); its serve: section sizes the endpoint")
    sv.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port to listen on (default: serve.port, 8000)")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any spec field, e.g. --set serve.max_batch_size=16 (repeatable)")
    sv.add_argument("--ray-address", help="attach to this Ray cluster (default: $RAY_ADDRESS, else an embedded "
                                          "local Ray)")
    sv.set_defaults(func=cmd_serve)
    return parser


def _environment_failure(err: BaseException) -> str | None:
    """The one-line message of an environment failure (exit code 3), or None for any other error: the output
    store refused a write (full, read-only, no permission) or Ray lost its cluster."""
    from batch.store.io import StorageError

    if isinstance(err, StorageError):
        return f"storage: {err}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
        return f"storage: {type(err).__name__}: {err}"
    if type(err).__module__.startswith("ray."):  # RaySystemError, node died, GCS unreachable, ...
        return f"cluster: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


JOB_COMMANDS = ("run", "resume", "retry-failed")
_EXIT_REASONS = {0: "done", 1: "rows failed above max_failed_fraction", 2: "unusable spec, manifest or model",
                 3: "environment failure or incomplete run"}


def _summary_line(args: argparse.Namespace, rc: int, error: str | None) -> None:
    """The last line a job command prints: one JSON object (``{"sdbatch_summary": ...}``) that automation
    (a CronJob, a RayJob's log) reads for the counts and the exit reason."""
    if getattr(args, "command", None) not in JOB_COMMANDS:
        return
    summary = getattr(args, "summary", None)
    counts = {k: v for k, v in summary.__dict__.items()} if summary is not None else None
    reason = _EXIT_REASONS.get(rc, "error") if error is None else error
    if summary is not None and not summary.complete:
        reason = "incomplete run: images without a committed record; sdbatch resume finishes it"
    print(json.dumps({"sdbatch_summary": counts, "exit_code": rc, "exit_reason": reason}, sort_keys=True,
                     default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one ``sdbatch`` command; exit codes: 0 done, 1 rows failed above ``max_failed_fraction``, 2 unusable
    spec/manifest/model, 3 environment failure (storage, cluster) or an incomplete run (README "Exit codes")."""
    args = build_parser().parse_args(argv)
    from batch.store.commit import RunExistsError, RunInProgressError
    from batch.plan.manifest import ManifestError
    from batch.models.weights import ModelError

    try:
        rc = args.func(args)
        _summary_line(args, rc, None)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except (SpecError, ManifestError, ModelError, RunExistsError, RunInProgressError) as err:
        print(f"sdbatch: error: {err}", file=sys.stderr)
        _summary_line(args, 2, str(err).splitlines()[0])
        return 2
    except BrokenPipeError:  # the reader went away (`sdbatch status | head -1`): stop quietly
        # https://docs.python.org/3/library/signal.html#note-on-sigpipe: send the rest of stdout to devnull so
        # the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as err:
        message = _environment_failure(err)
        if message is None:
            raise
        print(f"sdbatch: error: {message} (exit 3: an environment failure; what was committed is kept, and the run resumes once it is fixed)",
              file=sys.stderr)
        _summary_line(args, 3, message)
        return 3


if __name__ == "__main__":
    sys.exit(main())

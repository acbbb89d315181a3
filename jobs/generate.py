"""Entry point for ``ray job submit --working-dir . -- python jobs/generate.py --config CONFIG [flags]``.

Takes the config as ``--config PATH`` (or positionally) and every ``sdbatch run`` flag (``--manifest``,
``--output``, ``--set key=value``, ``--quiet``, ...). Inside a submitted job ``RAY_ADDRESS`` is set, so the
library connects to the cluster instead of starting an embedded Ray.

Scheduled runs: ``--dated-output BASE [--date YYYY-MM-DD]`` writes to ``BASE/dt=YYYY-MM-DD/`` (default: today,
UTC) with run id ``dt-YYYY-MM-DD`` unless ``--run-id`` is given, so every attempt on one day targets the same
run (see ``batch/spec/schedule.py``). The day also becomes the spec's ``date`` (``sdbatch run --date``):
recorded in ``run.json``, and the source of the run seed with ``seed_per_day: true``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.cli import main as sdbatch_main  # noqa: E402
from batch.spec.schedule import dated_prefix, parse_day, scheduled_run_id  # noqa: E402


def run_argv(argv: list[str]) -> list[str]:
    """Translate this script's arguments into ``sdbatch run`` arguments."""
    pre = argparse.ArgumentParser(prog="jobs/generate.py", add_help=False,
                                  description="Generation job entry point; every other flag is `sdbatch run`'s:")
    pre.add_argument("--config", help="YAML job spec (or give it positionally)")
    pre.add_argument("--dated-output", metavar="BASE", help="write to BASE/dt=YYYY-MM-DD/ (scheduled runs)")
    pre.add_argument("--date", metavar="YYYY-MM-DD", help="the day for --dated-output (default: today, UTC)")
    known, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        pre.print_help()
        print()
    if known.date and not known.dated_output:  # an explicit output: the day is only the spec's date
        try:
            parse_day(known.date)
        except ValueError as err:
            pre.error(str(err))
        rest += ["--date", known.date]
    if known.dated_output:
        if "--output" in rest or any(a.startswith("--output=") for a in rest):
            pre.error("give --dated-output or --output, not both")
        try:
            day = parse_day(known.date)
        except ValueError as err:
            pre.error(str(err))
        rest += ["--output", dated_prefix(known.dated_output, day), "--date", day.isoformat()]
        if "--run-id" not in rest and not any(a.startswith("--run-id=") for a in rest):
            rest += ["--run-id", scheduled_run_id(day)]
    return ["run", *([known.config] if known.config else []), *rest]


def main(argv: list[str] | None = None) -> int:
    return sdbatch_main(run_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

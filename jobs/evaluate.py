"""Entry point for `ray job submit --working-dir . -- python jobs/evaluate.py --config CONFIG [flags]`.

Same flags as `sdbatch eval` (`--coco-captions`, `--coco-images`, `--output`, `--limit`, `--fid-stats`,
`--set`); the config may be given positionally or as `--config`. Inside a submitted job RAY_ADDRESS is set,
so generation and feature extraction run on the cluster's actors and this driver only reduces statistics.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.cli import main  # noqa: E402


def _argv(args: list[str]) -> list[str]:
    """`--config X` / `--config=X` -> positional X (what `sdbatch eval` takes)."""
    out, config = [], []
    it = iter(args)
    for a in it:
        if a == "--config":
            config.append(next(it, ""))
        elif a.startswith("--config="):
            config.append(a.split("=", 1)[1])
        else:
            out.append(a)
    return ["eval", *config, *out]


if __name__ == "__main__":
    sys.exit(main(_argv(sys.argv[1:])))

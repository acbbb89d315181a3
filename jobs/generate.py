"""Entry point for `ray job submit --working-dir . -- python jobs/generate.py CONFIG [flags]`.

Same flags as `sdbatch run`; inside a submitted job RAY_ADDRESS is set, so the library connects to the
cluster instead of starting an embedded Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

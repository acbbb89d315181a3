#!/usr/bin/env bash
# Issue 18 on the GPU machine, in one run of at most 9 minutes: install the wheel bundle, then
# bench/gpu_e2e.py (every measurement, budgeted; RESULT lines in $OUT/gpu_e2e/results.txt).
#
#   bench/gpu_e2e.sh [gpu_e2e.py arguments, e.g. --parts build,e2e_eager_b16,...]
#   bench/gpu_e2e.sh --smoke           (CPU: no install, tiny model)
#
# The bundle (bench/make_gpu_bundle.sh -> bench/gpu_wheels, git-ignored) travels with the working tree
# (carry it). Only the wheels whose distribution is missing on the machine or does not satisfy
# bench/gpu_wheels/requirements.txt are installed, with --no-deps into a target folder put on PYTHONPATH
# (Ray workers inherit it), so the image's torch/transformers/pyarrow stay as they are.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_e2e_out}
export OUT
mkdir -p "$OUT/gpu_e2e"
TOTAL_S=${GPU_E2E_TOTAL_S:-530}   # the whole run, install included (the run tool allows 600 s)
PY=${PYTHON:-python3}

case " $* " in
  *" --smoke "*) ;;
  *)
    WHEELS=bench/gpu_wheels
    SITE=${GPU_E2E_SITE:-/tmp/sdbatch-site}
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        echo "RESULT part=install status=failed reason=no_bundle_(run_bench/make_gpu_bundle.sh_and_carry_bench/gpu_wheels)" | tee -a "$OUT/gpu_e2e/results.txt"
        exit 1
    fi
    need=$("$PY" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder = Path(sys.argv[1])
wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in folder.glob("*.whl")}
for line in (folder / "requirements.txt").read_text().split():
    req = Requirement(line)
    try:
        ok = version(req.name) in req.specifier
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(wheels[canonicalize_name(req.name)])
EOF
)
    t0=$(date +%s)
    if [ -n "$need" ]; then
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" $need > "$OUT/gpu_e2e/install.log" 2>&1 \
            || { echo "RESULT part=install status=failed log=install.log" | tee -a "$OUT/gpu_e2e/results.txt"; tail -20 "$OUT/gpu_e2e/install.log"; exit 1; }
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "RESULT part=install seconds=$(( $(date +%s) - t0 )) wheels=$(echo $need | wc -w)" | tee -a "$OUT/gpu_e2e/results.txt"
    "$PY" -c "import ray, diffusers, pydantic, torch; print('versions', ray.__version__, diffusers.__version__, pydantic.__version__, torch.__version__, torch.cuda.get_device_name(0))" \
        || { echo "RESULT part=install status=import_failed" | tee -a "$OUT/gpu_e2e/results.txt"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/gpu_e2e/nvidia-smi.txt" 2>&1 || true
    ;;
esac

LEFT=$(( TOTAL_S - ($(date +%s) - START) ))
exec "$PY" bench/gpu_e2e.py --out "$OUT/gpu_e2e" --budget-s "$LEFT" "$@"

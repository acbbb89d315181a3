#!/usr/bin/env bash
# Build the wheel bundle that travels with the working tree to the GPU benchmark machine (issue 18).
#
# That machine (../shared/ENVIRONMENT.md) has Python 3.12, torch 2.11 (cu130), transformers 5.17, pyarrow,
# fsspec, safetensors, pillow, msgpack, aiohttp, click, filelock, protobuf, pyyaml, requests, but no Ray,
# diffusers or pydantic, and no network. A run carries at most 64 MiB (working tree included), so:
#   * Ray 2.60.0's cp312 manylinux wheel (79 MB) is stripped of the Java jars, RLlib and the dashboard's web
#     client, which a Python batch job never imports: zip -d WHEEL 'ray/jars/*' 'ray/rllib/*' 'ray/dashboard/client/*'
#   * pandas (Ray Data needs it; the image may lack it) without its own test suite (pandas/tests, 2.5 MiB)
#   * the other wheels are the project's imports (and their requirements) that the image lacks or may have
#     too old; bench/gpu_e2e.sh installs only those that are missing or do not satisfy BUNDLE_REQUIREMENTS
#     (bench/gpu_wheels/requirements.txt, written here).
# The folder is git-ignored. Prints the bundle size and the total with the tracked working tree.
#
#     bench/make_gpu_bundle.sh [DIR]      (default bench/gpu_wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench/gpu_wheels}
PY=${PYTHON:-/work/main/.venv/bin/python}
LIMIT_MIB=64
mkdir -p "$DIR"

# requirement (as the installer checks it against the image)  |  exact wheel to download
# versions: constraints.txt where the project pins them (the CPU machine's tested set)
cat > "$DIR/requirements.txt" <<'EOF'
ray==2.60.0
diffusers==0.42.1
pydantic==2.14.3
pydantic-core==2.50.4
annotated-types>=0.6.0
typing-inspection>=0.4.4
typing-extensions>=4.16.0
jsonschema>=4.0
jsonschema-specifications>=2023.3.6
referencing>=0.28.4
rpds-py>=0.7.1
attrs>=22.2.0
importlib-metadata>=4.0
zipp>=3.20
accelerate>=1.0
psutil>=5.0
packaging>=24.2
safetensors>=0.8.0
huggingface-hub>=1.32.0
pandas>=2.2.3
python-dateutil>=2.8.2
tzdata>=2022.7
six>=1.5
EOF
# huggingface-hub: the newest 1.x (diffusers 0.42 needs >= 1.32; transformers 5.17 on the image was built
# against 1.x); pandas: Ray Data requires >= 2.2.3, installed only where the image lacks it.
PINS="ray==2.60.0 diffusers==0.42.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
typing-inspection==0.4.5 typing-extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 importlib-metadata==10.2.0 zipp==4.1.2
accelerate==1.15.0 psutil==7.2.2 packaging==26.3 safetensors==0.8.0 huggingface-hub==1.33.0 pandas==2.3.3
python-dateutil==2.9.0.post0 tzdata==2025.2 six==1.17.0"

# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$DIR" $PINS

RAY=$(ls "$DIR"/ray-2.60.0-*.whl)
if unzip -l "$RAY" 'ray/jars/*' >/dev/null 2>&1; then
    before=$(stat -c %s "$RAY")
    zip -q -d "$RAY" 'ray/jars/*' 'ray/rllib/*' 'ray/dashboard/client/*'
    echo "stripped $(basename "$RAY"): $((before / 1048576)) MiB -> $(( $(stat -c %s "$RAY") / 1048576 )) MiB"
fi

PANDAS=$(ls "$DIR"/pandas-*.whl)
if unzip -l "$PANDAS" 'pandas/tests/*' >/dev/null 2>&1; then
    zip -q -d "$PANDAS" 'pandas/tests/*'  # pandas' own test suite: 2.5 MiB compressed, never imported
fi

bundle=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s}')
total=$((bundle + tree))
ls -l "$DIR"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
printf 'bundle %.1f MiB + tracked tree %.1f MiB = %.1f MiB (limit %d MiB)\n' \
    "$(echo "$bundle / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "over the ${LIMIT_MIB} MiB a GPU run can carry" >&2
    exit 1
fi

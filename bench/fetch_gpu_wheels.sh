#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_checks.sh installs offline on a GPU machine without megatron-core (the lent
# machines: Python 3.12, torch, triton, no megatron-core, no Transformer Engine, no network):
#   bash bench/fetch_gpu_wheels.sh [DIR]       # default bench/gpu_wheels (git-ignored), on a machine with PyPI
# then carry DIR along with the checkout and run `bash bench/gpu_checks.sh` there (MEGAMOE_GPU_WHEELS=DIR if
# it is not the default). DIR gets the wheels and a requirements.txt pinning them; gpu_checks.sh installs exactly
# those, with --no-index --no-deps, into a folder it puts on PYTHONPATH.
# What is fetched: megatron-core (it needs torch, numpy and packaging>=24.2: torch and numpy are there, packaging
# is fetched too so its version is never in doubt). Python 3.12 means megatron-core 0.17 or newer.
# Settings: PYTHON_VERSION (3.12), MEGATRON_CORE (0.19.2), PACKAGING (26.2).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-bench/gpu_wheels}
py=${PYTHON_VERSION:-3.12}
pins=("megatron-core==${MEGATRON_CORE:-0.19.2}" "packaging==${PACKAGING:-26.2}")
mkdir -p "$dir"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${pins[@]}"
printf '%s\n' "${pins[@]}" >"$dir/requirements.txt"
echo "fetched into $dir for Python $py:"
ls -l "$dir"

#!/usr/bin/env bash
# Every check a CPU machine cannot make, in one run on a CUDA machine (under 10 minutes: the steps' timeouts):
#   bash bench/gpu_checks.sh [OUT_DIR]        # default ./gpu_checks; each step's output in OUT_DIR/<step>.txt
# 1. the kernel and grouped-GEMM tests' CUDA cases; 2. bench_kernels (Triton scan vs copy bandwidth, the 70% / 50%
# targets of issue #7); 3. bench_experts (grouped GEMM vs the loop); 4. a short bf16 training run on this GPU
# (NCCL, Triton scan, grouped GEMM and, when importable, Transformer Engine).
# A failing step does not stop the others; the exit status is the number of failed steps.
#
# Self-sufficient on a machine with no network and no megatron-core (the lent GPU machines: Python 3.12, torch,
# triton): when `import megatron.core` fails, the wheels in MEGAMOE_GPU_WHEELS (default bench/gpu_wheels, which
# `bash bench/fetch_gpu_wheels.sh` fills on a machine with PyPI; carry that git-ignored folder along) are
# installed offline (pip --no-index --no-deps, exactly the pins of its requirements.txt) into OUT_DIR/site, which
# goes first on PYTHONPATH for every step.
#   bash bench/gpu_checks.sh --install WHEEL_DIR TARGET   that install step alone (no GPU needed; tests use it)
set -uo pipefail
cd "$(dirname "$0")/.."

install_wheels() {  # install_wheels WHEEL_DIR TARGET: the bundle's pinned wheels, offline, into TARGET
    local wheels=$1 target=$2
    if [ ! -f "$wheels/requirements.txt" ]; then
        echo "no $wheels/requirements.txt: fetch the wheels with 'bash bench/fetch_gpu_wheels.sh $wheels' on a" \
             "machine with network and carry the folder along" >&2
        return 1
    fi
    python -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --find-links "$wheels" --target "$target" -r "$wheels/requirements.txt"
}

if [ "${1:-}" = "--install" ]; then
    [ $# -eq 3 ] || { echo "usage: bash bench/gpu_checks.sh --install WHEEL_DIR TARGET" >&2; exit 2; }
    install_wheels "$2" "$3"
    exit $?
fi

if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks.sh needs a CUDA GPU; on CPU the test suite already covers what runs here" >&2
    exit 2
fi
out=${1:-gpu_checks}
mkdir -p "$out"
out=$(cd "$out" && pwd)
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
        echo "   ok in $((SECONDS - start)) s"
    else
        echo "   FAILED (status $?) in $((SECONDS - start)) s; tail of $out/$name.txt:"
        tail -n 20 "$out/$name.txt" | sed 's/^/   | /'
        failed=$((failed + 1))
    fi
}

if ! python -c "import megatron.core" 2>/dev/null; then
    wheels=${MEGAMOE_GPU_WHEELS:-bench/gpu_wheels}
    echo "== megatron-core is not installed: installing the wheels of $wheels offline into $out/site"
    if install_wheels "$wheels" "$out/site" >"$out/install_wheels.txt" 2>&1; then
        export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        cat "$out/install_wheels.txt" >&2
        failed=$((failed + 1))
    fi
fi
python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
python -c "import megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__)" 2>&1 \
    | tail -n 1 | tee -a "$out/versions.txt"
# Install megamoe in place when it is not importable (no network needed).
if ! python -c "import megamoe.kernels" 2>/dev/null; then
    pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
fi
step tests 150 python -m pytest -q -rs tests/kernels tests/model/test_moe.py
step bench_kernels 210 python bench/bench_kernels.py
step bench_experts 90 python bench/bench_experts.py
step train_bf16 120 python -m megamoe.cli.train --data.mock true --model.vocab_size 4096 --bf16 \
    --seq-length 1024 --micro-batch-size 8 --global-batch-size 8 --train-iters 30 --eval-interval 0 \
    --log-interval 10 --logging.log_dir "$out/train_bf16"
cat "$out"/bench_kernels.txt "$out"/bench_experts.txt 2>/dev/null  # the tables to record
tail -n 4 "$out"/train_bf16.txt 2>/dev/null
exit "$failed"

#!/usr/bin/env bash
# Every check a CPU machine cannot make, in one run on a CUDA machine (under 10 minutes: the steps' timeouts):
#   bash bench/gpu_checks.sh [OUT_DIR]        # default ./gpu_checks; each step's output in OUT_DIR/<step>.txt
# 1. the kernel and grouped-GEMM tests' CUDA cases; 2. bench_kernels (Triton scan vs copy bandwidth, the 70% / 50%
# targets of issue #7); 3. bench_experts (grouped GEMM vs the loop); 4. a short bf16 training run on this GPU
# (NCCL, Triton scan, grouped GEMM and, when importable, Transformer Engine), when megatron-core is installed.
# A failing step does not stop the others; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
mkdir -p "$out"
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

if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks.sh needs a CUDA GPU; on CPU the test suite already covers what runs here" >&2
    exit 2
fi
python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
# megamoe.kernels is the kernels/ folder, mapped by setup.py: install in place when it is not (no network needed).
if ! python -c "import megamoe.kernels" 2>/dev/null; then
    pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
fi
step tests 150 python -m pytest -q -rs tests/kernels tests/model/test_moe.py
step bench_kernels 210 python bench/bench_kernels.py
step bench_experts 90 python bench/bench_experts.py
if python -c "import megatron.core" 2>/dev/null; then
    step train_bf16 120 python -m megamoe.cli.train --data.mock true --model.vocab_size 4096 --bf16 \
        --seq-length 1024 --micro-batch-size 8 --global-batch-size 8 --train-iters 30 --eval-interval 0 \
        --log-interval 10 --logging.log_dir "$out/train_bf16"
else
    echo "== train_bf16: skipped (megatron-core is not installed)"
fi
cat "$out"/bench_kernels.txt "$out"/bench_experts.txt 2>/dev/null  # the tables to record
exit "$failed"

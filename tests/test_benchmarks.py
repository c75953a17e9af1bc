"""Every benchmark in bench/ runs at its smallest size and prints its table with the ratio against the reference
it measures in the same run. Times are not checked here (the benchmarks are where speed is judged); this keeps
them from breaking unnoticed."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLEST = {  # bench: (arguments, what its output must show)
    "bench_checkpoint": (["--quick", "--repeats", "1", "--steps", "2"], r"async / sync stall: \d+\.\d+x"),
    "bench_packed": (["--quick"], r"\| causal_conv1d \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|"),
    "bench_experts": (["--quick", "--reps", "1"], r"\| loop / grouped \|.*\n(.*\n)*\| 8 \| 512 .* \d+\.\d+x \|"),
    "bench_recompute": (["--quick", "--steps", "1"], r"recompute / none: kept memory \d+\.\d+x, step time \d+\.\d+x"),
    "bench_scan": (["--quick", "--min-time", "0.1", "--repeats", "1"], r"within tolerance"),
    "bench_preprocess": (["--mb", "0.3", "--vocab-size", "500"], r"\| megamoe preprocess \| 2 \| 2 \|.* \| yes \|"),
    "bench_pipeline": (["--micro-batches", "2", "--blocks", "4", "--d-model", "32", "--seq", "32", "--steps", "1"],
                       r"1F1B +2 +\d+\.\d+ +\d+\.\d+ +\d+\.\d+% +50\.0%"),
    "bench_comm": (["--seq", "32", "--mbs", "2", "--vocab", "256"], r"ep_all_to_all +0 +\d+\.\d+ +\d+\.\d+ +\d\.\d+"),
    "bench_context": (["--seq", "256", "--cp", "2", "--vocab", "256"], r"\| 2 \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|"),
    "bench_kernels": (["--interpret", "--shapes", "8x64", "--iters", "1", "--batch", "1"], r"\(ok\)"),
    "bench_generate": (["--d-model", "64", "--blocks", "1", "--experts", "2", "--vocab", "256", "--contexts", "64",
                        "128", "--batches", "1", "2", "--steps", "2", "--products"],
                       r"\| MoE-Mamba compiled \| 128 \| 2 \|(.*\n)*.*batch-1 step / floor at the worst context: "
                       r"MoE-Mamba \d+\.\d+x, "
                       r"MoE-Mamba compiled \d+\.\d+x(.*\n)*\| expert w2 .* \| 8 \| \d+\.\d+ \|"),
    "bench_train": (["--quick", "--d-model", "64", "--layers", "2", "--vocab", "512", "--steps", "1", "--profile"],
                    r"vs HF tokens/s: \d+\.\d+x.*MFU Mamba \d+\.\d+%, MoE-Mamba \d+\.\d+%(.*\n)*.*Self CPU"),
}


def test_every_benchmark_is_covered():
    assert sorted(SMALLEST) == sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "bench")) if f.endswith(".py"))


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(SMALLEST))
def test_benchmark_prints_its_table(bench):
    args, expected = SMALLEST[bench]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", f"{bench}.py"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(expected, out.stdout), out.stdout[-3000:]


def test_gpu_checks_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    import torch
    script = os.path.join(REPO, "bench", "gpu_checks.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the script would run its checks")
    out = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr

"""The Switch experts' computation three ways, forward+backward in ms (median of several calls):

- grouped: megamoe's default, every local expert in one grouped GEMM per weight (torch's grouped_mm; CUTLASS
  kernels on CUDA);
- loop: megamoe's fallback (unaligned widths, fp32 on CUDA, torch without grouped_mm), one pair of matmuls per
  expert over `unbind`-ed weights; the reference the ratio is taken against;
- indexed loop: the same loop indexing `w1[e]` per expert, as megamoe did before: each index's backward adds a
  full-size gradient, so its cost grows with experts squared.

    python bench/bench_experts.py                  # on CUDA when present (bf16), else CPU (fp32 and bf16)
    python bench/bench_experts.py --quick

Tokens are routed uniformly at random (Switch with its load-balancing loss is close to this). Exits with status
1 if the grouped output or gradients differ from the loop's by more than the dtype's tolerance.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.model.moe import Experts  # noqa: E402

CPU_SHAPES = [(8, 2048, 256, 1024), (32, 2048, 256, 1024), (32, 4096, 512, 2048)]  # experts, tokens, d, d_ffn
GPU_SHAPES = [(8, 16384, 1024, 4096), (32, 16384, 1024, 4096), (128, 32768, 1024, 2048)]
QUICK_SHAPES = [(8, 512, 128, 512), (32, 512, 128, 512)]


def indexed_loop(experts: Experts, x, counts):
    return torch.cat([experts.expert(e, chunk) for e, chunk in enumerate(x.split(counts)) if chunk.shape[0]])


def time_fwd_bwd(fns: dict, x, counts, grad, reps) -> dict:
    """Median ms of fn(x, counts).backward(grad) per fn, the fns called in turn (round-robin), so drift of the
    allocator or the machine's load falls on all of them alike."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):  # the first round warms up
        for name, fn in fns.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x, counts).backward(grad)
            if x.is_cuda:
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def bench(shape, device, dtype, reps):
    num_experts, tokens, d_model, d_ffn = shape
    torch.manual_seed(0)
    experts = Experts(num_experts, d_model, d_ffn, d_model, "gelu").to(device=device, dtype=dtype)
    counts = torch.randint(0, num_experts, (tokens,)).bincount(minlength=num_experts).tolist()
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d_model, device=device, dtype=dtype)
    fits = experts.grouped_fits(torch.device(device), dtype, d_model)

    def grouped(x, counts):
        experts.grouped_gemm = True
        return experts(x, counts)

    def loop(x, counts):
        experts.grouped_gemm = False
        return experts(x, counts)

    def outputs(fn):
        for p in [x, *experts.parameters()]:
            p.grad = None
        y = fn(x, counts)
        y.backward(grad)
        return [y.detach()] + [p.grad.clone() for p in [x, *experts.parameters()]]

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
               for a, b in zip(outputs(grouped), outputs(loop))) if fits else 0.0
    row = time_fwd_bwd({"loop": loop, **({"grouped": grouped} if fits else {})}, x, counts, grad, reps)
    row.setdefault("grouped", float("nan"))
    row.update(time_fwd_bwd({"indexed": lambda x, c: indexed_loop(experts, x, c)}, x, counts, grad, max(1, reps // 2)))
    return row, diff, diff <= tol


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if device == "cuda" else CPU_SHAPES
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    print(f"Switch experts fwd+bwd, gelu, {name}, torch {torch.__version__}, median of {args.reps}")
    print("| experts | tokens | d_model | d_ffn | dtype | indexed loop ms | loop ms | grouped ms "
          "| loop / grouped | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for dtype in dtypes:
        for shape in shapes:
            row, diff, good = bench(shape, device, dtype, args.reps)
            ok &= good
            print(f"| {' | '.join(map(str, shape))} | {str(dtype).replace('torch.', '')} | {row['indexed']:.1f} | "
                  f"{row['loop']:.1f} | {row['grouped']:.1f} | {row['loop'] / row['grouped']:.2f}x | "
                  f"{diff:.1e}{'' if good else ' FAIL'} |")
    if not ok:
        sys.exit("grouped GEMM results differ from the loop's beyond tolerance")


if __name__ == "__main__":
    main()

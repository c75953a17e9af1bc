"""The cost of packed documents (seq_idx) in the CPU scan and the causal conv: forward + backward with and
without it, on the same tensors, in one run.

    python bench/bench_packed.py            # batch 4, d_inner 512, d_state 16, L 2048, documents of ~256 tokens
    python bench/bench_packed.py --quick

Each cell is the best of --repeats calls after a warm-up; the rows alternate, so a slow moment of the machine
hits both. Target: seq_idx at most 10% slower (ratio <= 1.10).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.ops import causal_conv1d  # noqa: E402
from megamoe.ops.scan_cpu import selective_scan_cpu  # noqa: E402


def packed_seq_idx(batch: int, length: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """Rows of documents with lengths drawn around `mean_doc` (exponential, as real corpora's are skewed)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = (torch.empty(length).exponential_(1.0 / mean_doc, generator=g).long() + 1).tolist()
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:length]
        rows.append(ids)
    return torch.stack(rows).to(torch.int32)


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=512)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--mean-doc", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.batch, args.d_inner, args.length, args.mean_doc, args.repeats = 2, 64, 256, 40, 2
    torch.set_num_threads(args.threads)
    b, d, n, L = args.batch, args.d_inner, 16, args.length
    g = torch.Generator().manual_seed(0)
    u, z, dy = (torch.randn(b, d, L, generator=g) for _ in range(3))
    delta = torch.randn(b, d, L, generator=g) - 4.0
    A, D, bias = -torch.arange(1, n + 1.0).repeat(d, 1), torch.ones(d), torch.zeros(d)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    w, cb = torch.randn(d, 1, 4, generator=g), torch.randn(d, generator=g)
    seq = packed_seq_idx(b, L, args.mean_doc)
    docs = int(seq[:, -1].sum() + b)

    def scan(seq_idx):
        leaves = [t.clone().requires_grad_() for t in (u, delta, B, C)]
        selective_scan_cpu(leaves[0], leaves[1], A, leaves[2], leaves[3], D, z, bias, True,
                           seq_idx=seq_idx).backward(dy)

    def conv(seq_idx):  # the weight and bias are trained too, as in a Mamba layer
        x, weight, conv_bias = (t.clone().requires_grad_() for t in (u, w, cb))
        causal_conv1d(x, weight, conv_bias, "silu", seq_idx=seq_idx).backward(dy)

    print(f"batch {b}, d_inner {d}, d_state {n}, L {L}, {docs} documents (mean {b * L / docs:.0f} tokens), fp32, "
          f"{args.threads} threads; fwd+bwd ms, best of {args.repeats}")
    print("| op | without seq_idx | with seq_idx | ratio |")
    print("|---|---|---|---|")
    worst = 0.0
    for name, fn in (("selective_scan_cpu", scan), ("causal_conv1d", conv)):
        without = with_ = float("inf")
        for _ in range(2):  # alternate the two, twice
            without = min(without, timed(lambda: fn(None), args.repeats))
            with_ = min(with_, timed(lambda: fn(seq), args.repeats))
        worst = max(worst, with_ / without)
        print(f"| {name} | {without:.1f} | {with_:.1f} | {with_ / without:.2f}x |")
    print(f"seq_idx costs at most {worst:.2f}x (target <= 1.10x: {'met' if worst <= 1.10 else 'missed'})")


if __name__ == "__main__":
    main()

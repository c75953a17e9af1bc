"""Activation recompute (--recompute-granularity full): memory kept for backward and step time, against no
recompute in the same run.

    python bench/bench_recompute.py              # MoE-Mamba MEMEMEME, d_model 256, batch 4 x 1024, fp32
    python bench/bench_recompute.py --quick

"kept MB" is what autograd holds for backward at the end of the forward (the tensors its saved-tensor hooks
see, counted once each), on any device; on CUDA "peak MB" adds torch.cuda.max_memory_allocated over the step.
"step s" is forward + backward, the median of --steps. Recompute trades one more forward of every block for
keeping only the blocks' inputs.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.config import ModelConfig  # noqa: E402
from megamoe.model import build_model  # noqa: E402


def kept_bytes(model, tokens) -> tuple:
    """(output, bytes of the distinct tensors saved for backward during the forward)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, labels=tokens)
    return out, sum(seen.values())


def run(cfg, batch, seq, recompute, steps, device):
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).to(device)
    for block in model.layers.values():
        block.recompute = recompute
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    out, kept = kept_bytes(model, tokens)
    out.loss.backward()
    times, peak = [], 0
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(tokens, labels=tokens).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        times.append(time.perf_counter() - start)
    return kept / 2 ** 20, peak / 2 ** 20, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d_model, batch, seq = (128, 2, 256) if args.quick else (256, 4, 1024)
    cfg = ModelConfig(pattern="MEMEMEME", d_model=d_model, d_state=16, num_experts=8, vocab_size=8000,
                      capacity_factor=1.0)
    print(f"MoE-Mamba MEMEMEME, d_model {d_model}, 8 experts, batch {batch} x {seq}, fp32, {device}; "
          f"median of {args.steps} steps")
    print("| recompute | kept MB | peak MB | step s |")
    print("|---|---|---|---|")
    rows = {}
    for recompute in (False, True):
        rows[recompute] = run(cfg, batch, seq, recompute, args.steps, device)
        kept, peak, step = rows[recompute]
        peak_text = f"{peak:.1f}" if device == "cuda" else "n/a"
        print(f"| {'full' if recompute else 'none'} | {kept:.1f} | {peak_text} | {step:.3f} |")
    (kept, _, step), (kept_r, _, step_r) = rows[False], rows[True]
    print(f"recompute / none: kept memory {kept_r / kept:.2f}x, step time {step_r / step:.2f}x")


if __name__ == "__main__":
    main()

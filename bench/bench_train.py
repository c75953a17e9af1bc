"""Training-step throughput on CPU: megamoe against HF transformers' MambaForCausalLM (with mambapy's
parallel scan, what transformers uses on CPU), both measured in this run, and an MoE-Mamba with the same active
parameters as the Mamba.

    python bench/bench_train.py            # d_model 256, 4 Mamba layers, d_state 16, vocab 8000, batch 4 x 512
    python bench/bench_train.py --quick    # batch 2 x 256

One step = forward, backward, AdamW update, fp32, torch threads = 2 (this machine's cores). Targets: megamoe's
Mamba >= 3x HF's tokens/s; MoE-Mamba step time <= 1.3x the same-active Mamba's.

MFU: model FLOPs per step (megamoe.training.metrics.flops_per_token: every matmul, attention, the scan, the LM
head; HF's Mamba is the same model, so its FLOPs are the Mamba row's) over the step time, against the fp32 GEMM
peak of this machine measured in the same run (a square matmul, the best of several). Target >= 30% for the Mamba
and MoE-Mamba rows. Where oneDNN has native bf16 (AVX512-BF16 or AMX), the bf16 GEMM peak is measured too, and a
row runs the Mamba step under --bf16 autocast against it; without native bf16 the header says so and the row is
left out. `--profile` adds the Mamba step's operators by self CPU time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_steps(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak(threads: int, n: int = 1024, reps: int = 7, dtype=torch.float32) -> float:
    """FLOP/s of an n x n x n matmul on `threads` threads, the best of `reps`: the machine's own ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_table(step, rows: int = 12) -> str:
    """The step's operators by self CPU time (torch.profiler), after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def hf_step(args):
    import transformers
    cfg = transformers.MambaConfig(hidden_size=args.d_model, num_hidden_layers=args.layers, state_size=16,
                                   vocab_size=args.vocab, use_mambapy=True, expand=2, tie_word_embeddings=True)
    model = transformers.MambaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (else it emulates them, slower than fp32)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def megamoe_step(args, pattern: str, bf16: bool = False):
    from megamoe.config import config_from_dict
    from megamoe.model import count_parameters
    from megamoe.parallel import destroy_distributed, init_distributed
    from megamoe.parallel.parallelize import build_parallel_model
    from megamoe.training import make_runner, train_step
    from megamoe.training.metrics import flops_per_token
    from megamoe.training.optimizer import build_optimizer

    cfg = config_from_dict({"model": {"pattern": pattern, "d_model": args.d_model, "d_state": 16,
                                      "vocab_size": args.vocab, "num_experts": 8},
                            "data": {"mock": True, "seq_length": args.seq},
                            "training": {"micro_batch_size": args.batch, "global_batch_size": args.batch,
                                         "bf16": bf16}})
    destroy_distributed()
    topo = init_distributed(cfg.parallel)
    model = build_parallel_model(cfg, topo)
    runner, opt = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(args.batch, args.seq))

    def step():
        train_step(runner, opt, [batch], cfg, topo, lr=1e-4)
    counts = count_parameters(cfg.model)
    return step, counts, flops_per_token(counts, cfg)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 256, 2 timed steps")
    parser.add_argument("--profile", action="store_true", help="print the Mamba step's operators by CPU time")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 256, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.batch * args.seq
    peak = gemm_peak(args.threads)
    bf16_peak = gemm_peak(args.threads, dtype=torch.bfloat16) if native_bf16() else None
    step, total = hf_step(args)
    hf_time = _time_steps(step, args.steps)
    mamba, counts, mamba_flops = megamoe_step(args, "M" * args.layers)
    mamba_time = _time_steps(mamba, args.steps)
    rows = [("HF MambaForCausalLM + mambapy", total, total, hf_time, mamba_flops),
            ("megamoe Mamba (" + "M" * args.layers + ")", counts["total"], counts["active"], mamba_time, mamba_flops)]
    table = profile_table(mamba) if args.profile else None
    step, counts, flops = megamoe_step(args, "ME" * (args.layers // 2))
    moe_time = _time_steps(step, args.steps)
    rows.append((f"megamoe MoE-Mamba ({'ME' * (args.layers // 2)}, 8 experts)", counts["total"], counts["active"],
                 moe_time, flops))
    if bf16_peak:
        step, counts, flops = megamoe_step(args, "M" * args.layers, bf16=True)
        rows.append(("megamoe Mamba, --bf16 (vs the bf16 peak)", counts["total"], counts["active"],
                     _time_steps(step, args.steps), flops))
    bf16_note = (f"bf16 GEMM peak {bf16_peak / 1e9:.0f} GFLOP/s ({bf16_peak / peak:.2f}x fp32)" if bf16_peak
                 else "no native bf16 on this CPU (oneDNN would emulate it, slower than fp32): no bf16 row")
    print(f"d_model {args.d_model}, d_state 16, vocab {args.vocab}, batch {args.batch} x {args.seq}, fp32, "
          f"{args.threads} threads; median of {args.steps} steps; fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s; "
          f"{bf16_note}")
    print(f"{'model':<44}{'total M':>9}{'active M':>10}{'step s':>9}{'tokens/s':>10}{'vs HF':>8}{'GFLOP/s':>9}"
          f"{'MFU':>7}")
    mfu = {}
    for name, total, active, t, per_token in rows:
        achieved = tokens * per_token / t
        mfu[name] = achieved / (bf16_peak if "--bf16" in name else peak)
        print(f"{name:<44}{total / 1e6:9.2f}{active / 1e6:10.2f}{t:9.3f}{tokens / t:10.0f}{hf_time / t:7.2f}x"
              f"{achieved / 1e9:9.1f}{100 * mfu[name]:6.1f}%")
    print(f"megamoe Mamba vs HF tokens/s: {hf_time / mamba_time:.2f}x (target >= 3x); "
          f"MoE-Mamba step / same-active Mamba step: {moe_time / mamba_time:.2f} (target <= 1.3); "
          f"MFU Mamba {100 * mfu[rows[1][0]]:.1f}%, MoE-Mamba {100 * mfu[rows[2][0]]:.1f}% (target >= 30%)"
          + (f"; bf16 Mamba {100 * mfu[rows[3][0]]:.1f}% of the bf16 peak" if bf16_peak else ""))
    if table:
        print(table)


if __name__ == "__main__":
    main()

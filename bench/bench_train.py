"""Training-step throughput on CPU: megamoe against HF transformers' MambaForCausalLM (with mambapy's
parallel scan, what transformers uses on CPU), both measured in this run, and an MoE-Mamba with the same active
parameters as the Mamba.

    python bench/bench_train.py            # d_model 256, 4 Mamba layers, d_state 16, vocab 8000, batch 4 x 512
    python bench/bench_train.py --quick    # batch 2 x 256

One step = forward, backward, AdamW update, fp32, torch threads = 2 (this machine's cores). Targets: megamoe's
Mamba >= 3x HF's tokens/s; MoE-Mamba step time <= 1.3x the same-active Mamba's.
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


def megamoe_step(args, pattern: str):
    from megamoe.config import config_from_dict
    from megamoe.model import count_parameters
    from megamoe.parallel import destroy_distributed, init_distributed
    from megamoe.parallel.parallelize import build_parallel_model
    from megamoe.training import make_runner, train_step
    from megamoe.training.optimizer import build_optimizer

    cfg = config_from_dict({"model": {"pattern": pattern, "d_model": args.d_model, "d_state": 16,
                                      "vocab_size": args.vocab, "num_experts": 8},
                            "data": {"mock": True, "seq_length": args.seq},
                            "training": {"micro_batch_size": args.batch, "global_batch_size": args.batch}})
    destroy_distributed()
    topo = init_distributed(cfg.parallel)
    model = build_parallel_model(cfg, topo)
    runner, opt = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(args.batch, args.seq))

    def step():
        train_step(runner, opt, [batch], cfg, topo, lr=1e-4)
    return step, count_parameters(cfg.model)


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
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 256, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.batch * args.seq
    rows = []
    step, total = hf_step(args)
    hf_time = _time_steps(step, args.steps)
    rows.append(("HF MambaForCausalLM + mambapy", total, total, hf_time))
    step, counts = megamoe_step(args, "M" * args.layers)
    mamba_time = _time_steps(step, args.steps)
    rows.append(("megamoe Mamba (" + "M" * args.layers + ")", counts["total"], counts["active"], mamba_time))
    step, counts = megamoe_step(args, "ME" * (args.layers // 2))
    moe_time = _time_steps(step, args.steps)
    rows.append((f"megamoe MoE-Mamba ({'ME' * (args.layers // 2)}, 8 experts)", counts["total"], counts["active"],
                 moe_time))
    print(f"d_model {args.d_model}, d_state 16, vocab {args.vocab}, batch {args.batch} x {args.seq}, fp32, "
          f"{args.threads} threads; median of {args.steps} steps")
    print(f"{'model':<44}{'total M':>9}{'active M':>10}{'step s':>9}{'tokens/s':>10}{'vs HF':>8}")
    for name, total, active, t in rows:
        print(f"{name:<44}{total / 1e6:9.2f}{active / 1e6:10.2f}{t:9.3f}{tokens / t:10.0f}{hf_time / t:7.2f}x")
    print(f"megamoe Mamba vs HF tokens/s: {hf_time / mamba_time:.2f}x (target >= 3x); "
          f"MoE-Mamba step / same-active Mamba step: {moe_time / mamba_time:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()

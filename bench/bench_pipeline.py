"""Pipeline bubble: step time of 1F1B and interleaved 1F1B beside the analytic bubble fraction.

    python bench/bench_pipeline.py                     # PP 2 on 2 gloo ranks, 4 and 8 micro-batches
    python bench/bench_pipeline.py --pp 4 --micro-batches 8 16 --blocks 16

Reference, measured in the same run: the same model and micro-batches on one process (one thread, as each
pipeline rank gets). The ideal pipelined step is that time / PP; the measured overhead is
(pipelined step - ideal) / ideal, which holds the bubble plus the stage-to-stage sends. Analytic bubble
(Megatron's definition, idle time over ideal time): 1F1B (PP - 1) / m; interleaved with v virtual stages
per rank (PP - 1) / (v m), for m micro-batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args, pp: int, vpp, schedule: str, micro: int):
    from megamoe.config import config_from_dict
    return config_from_dict({
        "model": {"pattern": "ME" * (args.blocks // 2), "d_model": args.d_model, "num_experts": 4,
                  "vocab_size": 1024, "capacity_factor": 0},
        "parallel": {"pipeline_model_parallel_size": pp, "virtual_pipeline_model_parallel_size": vpp,
                     "pipeline_schedule": schedule},
        "data": {"mock": True, "seq_length": args.seq},
        "training": {"micro_batch_size": args.mbs, "global_batch_size": args.mbs * micro}})


def _step_time(args, pp: int, vpp, schedule: str, micro: int) -> float:
    from megamoe.parallel import init_distributed, set_seed
    from megamoe.parallel.parallelize import build_parallel_model
    from megamoe.training import make_runner, train_step
    from megamoe.training.optimizer import build_optimizer

    torch.set_num_threads(1)
    cfg = _config(args, pp, vpp, schedule, micro)
    topo = init_distributed(cfg.parallel)
    set_seed(0)
    model = build_parallel_model(cfg, topo)
    runner, optimizer = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (micro, args.mbs, args.seq + 1), generator=gen)
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(args.mbs, args.seq)) for t in tokens]
    times = []
    for _ in range(args.steps + 1):  # the first step warms up
        start = time.perf_counter()
        train_step(runner, optimizer, batches, cfg, topo, lr=1e-4)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--virtual", type=int, default=2, help="virtual stages per rank for interleaved 1F1B")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    from megamoe.parallel import destroy_distributed
    from megamoe.testing import run_on_ranks

    print(f"MoE-Mamba {args.blocks} blocks, d_model {args.d_model}, micro-batch {args.mbs} x {args.seq}, "
          f"PP {args.pp} on {args.pp} gloo ranks (1 thread each); reference: 1 process, 1 thread")
    print(f"{'schedule':<22}{'m':>4}{'step s':>9}{'ideal s':>9}{'overhead':>10}{'analytic bubble':>17}")
    for micro in args.micro_batches:
        try:
            single = _step_time(args, 1, None, "1f1b", micro)
        finally:
            destroy_distributed()
        ideal = single / args.pp
        print(f"{'1 process (reference)':<22}{micro:>4}{single:9.3f}{single:9.3f}{'-':>10}{'-':>17}")
        for name, vpp, schedule, bubble in (
                ("1F1B", None, "1f1b", (args.pp - 1) / micro),
                (f"interleaved (v={args.virtual})", args.virtual, "interleaved_1f1b",
                 (args.pp - 1) / (args.virtual * micro))):
            step = max(run_on_ranks(_step_time, args.pp, args=(args, args.pp, vpp, schedule, micro), timeout=900))
            print(f"{name:<22}{micro:>4}{step:9.3f}{ideal:9.3f}{(step - ideal) / ideal:10.1%}{bubble:17.1%}")


if __name__ == "__main__":
    main()

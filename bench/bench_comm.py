"""Bytes each rank moves per training step, by kind, measured by the counting communication wrappers
(megamoe.parallel.comm.COUNTER), beside the analytic minimum for the same model and layout.

    python bench/bench_comm.py                              # quickstart model, TP 2 and EP 2 on 4 gloo ranks
    python bench/bench_comm.py --tp 2 --ep 1 --world 2 --config examples/paper/moe_mamba_25m.yaml --seq 256
    python bench/bench_comm.py --tp 1 --ep 1 --cp 4 --world 4 --seq 1024     # context parallelism

Analytic minimum, per micro-batch of T tokens (ring all-reduce: each rank sends 2 (n-1)/n of the buffer):
- TP all-reduces: the embedding's output; per Mamba layer x_proj's (dt, B, C) and out_proj's output forward,
  in_proj's input gradient and (dt, B, C)'s gradient backward; per attention / dense FFN one forward and one
  backward; the LM head's input gradient; 3 floats per token in the vocab-parallel cross entropy; experts split
  over TP one forward and one backward of the tokens they receive.
- DP all-reduces: every gradient once per step (dense over DP, experts over expert-DP).
- EP all-to-alls: with balanced routing and nothing dropped, (EP-1)/EP of the T x top_k routed tokens leave the
  rank four times per MoE layer (dispatch and combine, forward and backward), plus the per-expert counts.
  Capacity drops and imbalance move the measured value away from this.
- CP, per Mamba layer, independent of the sequence length: every rank but the last sends its slice's carried
  state (batch x d_inner x d_state) and conv halo (batch x d_inner x (d_conv - 1)) forward, every rank but the
  first their gradients backward: 2 x batch x d_inner x (d_state + d_conv - 1) x 4 bytes for a middle rank;
  per MoE layer an all-gather of the per-row, per-expert counts (top_k x batch x E int64) and an all-reduce of
  the two loss shares; per micro-batch an all-reduce of the token count. Dense gradients reduce over DP x CP.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megamoe", "configs",
                          "quickstart.yaml")


def _config(args):
    from megamoe.config import build_config
    cfg = build_config(args.config, ["--data.mock", "true", "--model.vocab_size", str(args.vocab),
                                     "--tensor-model-parallel-size", str(args.tp),
                                     "--expert-model-parallel-size", str(args.ep),
                                     "--context-parallel-size", str(args.cp),
                                     "--seq-length", str(args.seq), "--micro-batch-size", str(args.mbs),
                                     "--global-batch-size", str(args.mbs * args.world // (args.tp * args.cp)),
                                     "--model.capacity_factor", str(args.capacity_factor)])
    return cfg


def _measure(args):
    from megamoe.model.moe import SwitchMoE
    from megamoe.parallel import init_distributed, set_seed
    from megamoe.parallel.comm import COUNTER
    from megamoe.parallel.parallelize import build_parallel_model
    from megamoe.training import make_runner, train_step
    from megamoe.training.optimizer import build_optimizer

    cfg = _config(args)
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    runner, optimizer = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
    gen = torch.Generator().manual_seed(topo.dp_rank)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.training.micro_batch_size, cfg.data.seq_length + 1),
                           generator=gen)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(tokens[:, 1:].shape))
    train_step(runner, optimizer, [batch], cfg, topo, lr=1e-4)  # warm-up
    COUNTER.reset()
    train_step(runner, optimizer, [batch], cfg, topo, lr=1e-4)
    dropped = sum(m.last_stats.dropped for m in model.modules() if isinstance(m, SwitchMoE))
    # Gradient averaging: dense parameters over DP, expert parameters over expert-DP (ring all-reduce).
    dp_bytes = 0.0
    for expert, size in ((False, topo.dp * topo.cp), (True, topo.edp)):
        numel = sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False) == expert)
        dp_bytes += 2 * (size - 1) / size * numel * 4
    return dict(COUNTER.bytes), dropped, dp_bytes, topo.cp_rank


def analytic(cfg, tp: int, ep: int, cp: int = 1, cp_rank: int = 0, element: int = 4) -> dict:
    """Minimum bytes per rank per step (one micro-batch) by kind, for the layout (CP: for CP rank cp_rank)."""
    from megamoe.config import block_kinds
    m = cfg.model
    tokens = cfg.training.micro_batch_size * cfg.data.seq_length // cp  # this rank's
    ring = 2 * (tp - 1) / tp
    kinds = block_kinds(m)
    tp_bytes = 0.0
    if tp > 1:
        per_token = m.d_model  # embedding forward
        per_token += sum(2 * (m.d_model + m.resolved_dt_rank + 2 * m.d_state) for k in kinds if "M" in k)
        per_token += sum(2 * m.d_model for k in kinds if k in ("A", "F"))
        per_token += sum(2 * m.d_model * m.top_k for k in kinds if "E" in k)  # experts split over TP
        per_token += m.d_model  # LM head input gradient
        tp_bytes = ring * tokens * (per_token * element + 3 * 4)
    ep_bytes = 0.0
    if ep > 1:
        moe_layers = sum("E" in k for k in kinds)
        ep_bytes = moe_layers * (4 * tokens * m.top_k * (ep - 1) / ep * m.d_model * element
                                 + 8 * m.num_experts * (ep - 1) / ep)
    out = {"tp_all_reduce": tp_bytes, "ep_all_to_all": ep_bytes}
    if cp > 1:
        batch, d_inner, mamba = cfg.training.micro_batch_size, m.d_inner // tp, sum("M" in k for k in kinds)
        sends = (cp_rank < cp - 1) + (cp_rank > 0)  # forward to the next rank, backward to the previous
        out["cp_scan_state"] = mamba * sends * batch * d_inner * m.d_state * element
        out["cp_conv_halo"] = mamba * sends * batch * d_inner * (m.d_conv - 1) * element
        moe_layers = sum("E" in k for k in kinds)
        out["cp_moe_counts"] = moe_layers * (cp - 1) * m.top_k * batch * m.num_experts * 8
        out["cp_moe_losses"] = moe_layers * 3 * 4  # aux, z, entropy: the whole micro-batch's
        out["cp_loss"] = 4  # the float32 token count
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=QUICKSTART)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--cp", type=int, default=1, help="--context-parallel-size")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="0: no dropping (measured = analytic "
                        "for TP; EP then differs only by routing imbalance)")
    args = parser.parse_args(argv)
    from megamoe.testing import run_on_ranks
    results = run_on_ranks(_measure, args.world, args=(args,), timeout=600)
    cfg = _config(args)
    print(f"model {cfg.model.pattern} d_model {cfg.model.d_model}, {cfg.model.num_experts} experts, "
          f"micro-batch {args.mbs} x {args.seq} tokens, fp32; TP {args.tp}, EP {args.ep}, CP {args.cp}, "
          f"world {args.world}")
    print(f"{'kind':<16} {'rank':>4} {'measured MB':>12} {'analytic MB':>12} {'ratio':>7}   dropped tokens")
    for rank, (counted, dropped, dp_bytes, cp_rank) in enumerate(results):
        expected = analytic(cfg, args.tp, args.ep, args.cp, cp_rank)
        expected["dp_all_reduce"] = dp_bytes
        for kind in sorted(set(counted) | {k for k, v in expected.items() if v}):
            got, want = counted.get(kind, 0), expected.get(kind, 0.0)
            ratio = f"{got / want:7.3f}" if want else "      -"
            print(f"{kind:<16} {rank:>4} {got / 1e6:12.6f} {want / 1e6:12.6f} {ratio}   {dropped}")


if __name__ == "__main__":
    main()

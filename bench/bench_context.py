"""Activation memory per rank under context parallelism: what one training micro-batch's forward keeps for its
backward, at CP 1, 2 and 4, against 1/CP of the CP 1 figure (the target: within 1.2x of it).

    python bench/bench_context.py                     # quickstart model, one 16k-token sequence, fp32
    python bench/bench_context.py --seq 4096 --cp 2

Measured on CPU with torch's saved-tensor hooks: every tensor autograd (or an op's own backward) saves, counted
once per storage, parameters left out. That is the memory recompute and CP exist to cut; the weights, gradients
and optimizer state are the same on every CP rank. Bytes each rank sends: bench/bench_comm.py --cp N.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megamoe", "configs",
                          "quickstart.yaml")


def _saved_bytes(args, cp: int) -> int:
    """This rank's bytes saved for backward by one micro-batch's forward (and its loss)."""
    from megamoe.config import build_config
    from megamoe.parallel import init_distributed, set_seed
    from megamoe.parallel.context_parallel import local_batch
    from megamoe.parallel.parallelize import build_parallel_model

    cfg = build_config(args.config, ["--data.mock", "true", "--model.vocab_size", str(args.vocab),
                                     "--context-parallel-size", str(cp), "--seq-length", str(args.seq),
                                     "--micro-batch-size", "1", "--global-batch-size", "1"])
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = local_batch(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, args.seq)), topo)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                    position_ids=batch.get("position_ids"))
    out.loss.backward()  # every rank's backward, so the CP ranks' exchanges pair up
    return sum(storages.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=QUICKSTART)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="CP sizes (CP 1, the reference, always runs)")
    args = parser.parse_args(argv)
    from megamoe.testing import run_on_ranks
    measured = {cp: max(run_on_ranks(_saved_bytes, cp, args=(args, cp), timeout=900))
                for cp in sorted({1, *args.cp})}
    print(f"quickstart-sized model ({os.path.basename(args.config)}), one {args.seq}-token sequence, fp32, CPU")
    print("| CP | saved for backward per rank (MiB) | ideal 1/CP of CP 1 (MiB) | ratio |")
    print("|---|---|---|---|")
    for cp, value in measured.items():
        ideal = measured[1] / cp
        print(f"| {cp} | {value / 2**20:.1f} | {ideal / 2**20:.1f} | {value / ideal:.2f}x |")


if __name__ == "__main__":
    main()

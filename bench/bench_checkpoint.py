"""Training stall per checkpoint save, synchronous (checkpoint.save) against --async-save (checkpoint.save_async),
in one run, one process, on this machine's disk.

    python bench/bench_checkpoint.py            # MoE-Mamba MEMEMEME, d_model 512, 4 experts: ~36M parameters,
                                                # a ~430 MB checkpoint with Adam's moments
    python bench/bench_checkpoint.py --quick

For each mode, `--steps` training steps run with one save after the first, and then wait for the save as the
next one would (the median of `--repeats`, the modes in turn). "stall s" is the time the training loop is
blocked by the save: the whole synchronous save (write, verification, rename); for the async one its CPU copy
and any wait at the end. "slowdown s" is what the steps took beyond the same steps without a save, minus the
stall: the background write's share of the cores while training goes on. Target: async stalls at most a quarter
of the synchronous save.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe import checkpoint  # noqa: E402
from megamoe.config import config_from_dict  # noqa: E402
from megamoe.model import build_model  # noqa: E402
from megamoe.training import TrainState  # noqa: E402
from megamoe.training.optimizer import build_optimizer  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class Trainer:
    def __init__(self, cfg, batch: int, seq: int):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = build_model(cfg.model, seed=0)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, torch.device("cpu"))
        self.tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1))
        self.state = TrainState()

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(self.tokens[:, :-1], labels=self.tokens[:, 1:]).loss.backward()
        self.optimizer.step()
        self.state.step += 1

    def steps(self, n: int, save=None) -> tuple:
        """n steps, `save(trainer)` after the first, waited for after the last; (total seconds, seconds blocked in
        the save call and the wait)."""
        start, blocked, pending = time.perf_counter(), 0.0, None
        for i in range(n):
            self.step()
            if i == 0 and save is not None:
                t = time.perf_counter()
                pending = save(self)
                blocked = time.perf_counter() - t
        if isinstance(pending, checkpoint.PendingSave):
            t = time.perf_counter()
            pending.wait()
            blocked += time.perf_counter() - t
        return time.perf_counter() - start, blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks the benchmark runs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    d, experts, vocab, batch, seq = (64, 2, 512, 1, 32) if args.quick else (512, 4, 8192, 2, 128)
    cfg = config_from_dict({"model": {"pattern": "MEMEMEME", "d_model": d, "num_experts": experts,
                                      "vocab_size": vocab},
                            "checkpoint": {"keep_last": 1}})
    trainer = Trainer(cfg, batch, seq)
    stager = checkpoint.BoxStager()  # as a run keeps it: its CPU copies are refilled save after save
    params = sum(p.numel() for p in trainer.model.parameters())
    root = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    try:
        trainer.steps(2)  # warm up; Adam's moments exist from here on
        modes = {"none": None,
                 "sync": lambda t: checkpoint.save(root, t.model, t.optimizer, t.state, t.cfg, None),
                 "async": lambda t: checkpoint.save_async(root, t.model, t.optimizer, t.state, t.cfg, None, stager)}
        results = {name: [] for name in modes}
        for _ in range(args.repeats):  # round-robin, so a slow moment of the machine hits every mode alike
            for name, save in modes.items():
                results[name].append(trainer.steps(args.steps, save))
        size = folder_bytes(checkpoint.resolve(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(total for total, _ in results["none"])
    print(f"model {params / 1e6:.1f}M parameters, checkpoint {size / 2 ** 20:.0f} MiB (model + Adam moments); "
          f"{args.steps} steps of {batch} x {seq} tokens per measurement, median of {args.repeats}")
    print("| save | steps s | stall s | slowdown s |")
    print("|---|---|---|---|")
    stalls = {}
    for name in modes:
        total = statistics.median(t for t, _ in results[name])
        stalls[name] = statistics.median(b for _, b in results[name])
        print(f"| {name} | {total:.2f} | {stalls[name]:.2f} | {total - base - stalls[name]:.2f} |")
    ratio = stalls["async"] / max(stalls["sync"], 1e-9)
    print(f"async / sync stall: {ratio:.2f}x (target <= 0.25x: {'met' if ratio <= 0.25 else 'missed'})")


if __name__ == "__main__":
    main()

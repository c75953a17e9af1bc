"""megamoe-train with faults injected, for the reliability tests: `python -m tests.faults <megamoe-train args>`.

MEGAMOE_TEST_FAULTS holds a JSON list of faults, each for one rank (RANK) and, under torchrun, only for the first
attempt (TORCHELASTIC_RESTART_COUNT 0):
    {"kind": "kill", "rank": 1, "step": 13}                  SIGKILL itself once step 13 is done
    {"kind": "kill_in_async_save", "rank": 1, "step": 10}   SIGKILL itself while the step-10 save is in flight
    {"kind": "nan", "rank": 1, "steps": [3], "layer": 1, "expert": 3}
                                                            expert 3 of layers.1's MoE outputs NaN in those steps
    {"kind": "spike", "step": 5, "scale": 30.0, "calls": 2}  the logits x 30 in step 5, for the LM head's first 2
                                                            calls (the first pass of 2 micro-batches; all: null)
    {"kind": "disk_full", "step": 6}                        the step-6 save fails: no space left on the device
    {"kind": "stop", "rank": 1, "step": 5}                  SIGSTOP itself (a hung rank) once step 5 is done
"""
import errno
import json
import os
import signal
import sys
import time

from torch.distributed.checkpoint import FileSystemWriter

import megamoe.checkpoint.saving as saving
import megamoe.training.trainer as trainer
from megamoe.cli.train import main
from megamoe.training.guard import StepGuard

RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
STEP = [0]  # the last step done on this rank


def _mine(fault: dict) -> bool:
    return fault.get("rank", RANK) == RANK and FIRST_ATTEMPT


def _after_step(faults: list):
    original = StepGuard.after

    def after(self, step, record, last_checkpoint):
        STEP[0] = step
        for f in faults:
            if f["kind"] in ("kill", "stop") and f["step"] == step:
                os.kill(os.getpid(), signal.SIGKILL if f["kind"] == "kill" else signal.SIGSTOP)
        return original(self, step, record, last_checkpoint)
    return after


def _spike_hook(f: dict):
    calls = [0]

    def hook(module, args, out):
        if STEP[0] + 1 != f["step"]:
            return out
        calls[0] += 1
        return out * f["scale"] if f.get("calls") is None or calls[0] <= f["calls"] else out
    return hook


def _faulty_model(faults: list):
    build = trainer.build_parallel_model

    def build_parallel_model(cfg, topo, paths=None):
        model = build(cfg, topo, paths)
        for f in faults:
            if f["kind"] == "spike":
                model.lm_head.register_forward_hook(_spike_hook(f))
                continue
            experts = model.layers[str(f["layer"])].moe.experts

            def hook(module, args, out, f=f):
                local = f["expert"] - module.first_expert
                if STEP[0] + 1 in f["steps"] and 0 <= local < module.num_experts:
                    counts = args[1]
                    start = sum(counts[:local])
                    out = out.clone()
                    out[start:start + counts[local]] = float("nan")
                return out
            experts.register_forward_hook(hook)
        return model
    return build_parallel_model


def _slow_finish(faults: list):
    finish = saving.PendingSave._finish

    def _finish(self, future, tmp, name, marker, topo, keep_last, group):
        if any(marker["step"] == f["step"] for f in faults):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)  # the background write of this step is in flight
        return finish(self, future, tmp, name, marker, topo, keep_last, group)
    return _finish


def _full_disk(faults: list):
    write = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if any(f"iter_{f['step']:07d}" in str(self.path) for f in faults):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, plan, planner)
    return write_data


def install(faults: list) -> None:
    mine = [f for f in faults if _mine(f)]
    StepGuard.after = _after_step([f for f in mine if f["kind"] in ("kill", "stop")])
    faulty = [f for f in mine if f["kind"] in ("nan", "spike")]
    if faulty:
        trainer.build_parallel_model = _faulty_model(faulty)
    slow = [f for f in mine if f["kind"] == "kill_in_async_save"]
    if slow:
        saving.PendingSave._finish = _slow_finish(slow)
    full = [f for f in faults if f["kind"] == "disk_full"]
    if full:
        FileSystemWriter.write_data = _full_disk(full)


if __name__ == "__main__":
    install(json.loads(os.environ.get("MEGAMOE_TEST_FAULTS", "[]")))
    sys.exit(main(sys.argv[1:]))

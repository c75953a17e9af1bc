"""Steps that go wrong, caught before the optimizer touches the weights: a non-finite loss or gradient, a spike.

Every rank decides alike without a word exchanged: the step's losses are means over the data-parallel ranks and
the gradient norm is global, so a NaN on any rank is seen on all of them. (Megatron's
--check-for-nan-in-loss-and-grad and --check-for-spiky-loss, with its --rerun-mode validate_results.)

- Non-finite (on by default): the step is skipped (weights, optimizer and LR schedule untouched, the data moves
  on, `nonfinite_steps` in the metrics), the same micro-batches run once more under a NonFiniteProbe to name
  where the value first went non-finite, and after max_nonfinite_skips such steps in a row the run stops with a
  TrainingError (the last good checkpoint is not overwritten). Under --fp16 a non-finite gradient with a finite
  loss is an overflow, the loss scaler's business, not this.
- Spike: a loss above spiky_loss_factor x the mean of the last SPIKE_WINDOW steps is reported with the
  micro-batches that carried it; with --rerun-mode validate_results the step runs again from the same state
  (weights, generators, data) and the verdict says whether the loss came back the same (deterministic: the data
  or the model) or not (transient: a fault of the hardware, or non-determinism).
"""
from __future__ import annotations

import collections
import math
from typing import Callable, Optional

import torch.distributed as dist

from megamoe.config import TrainingConfig
from megamoe.errors import TrainingError
from megamoe.logging import ONCE, get_logger
from megamoe.training.nonfinite import Finding, NonFiniteProbe

log = get_logger()

SPIKE_WINDOW = 20  # steps whose mean loss a spike is measured against
SPIKE_MIN_HISTORY = 5  # no spike is called before this many steps


def _everyone(obj) -> list:
    """Every rank's `obj`, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StepGuard:
    """The policy over a run's steps; `trouble` classifies a step, `locate` / `rerun_verdict` explain it, `after`
    keeps the history and stops the run."""

    def __init__(self, training: TrainingConfig):
        self.check_nan = training.check_for_nan_in_loss_and_grad
        self.max_skips = training.max_nonfinite_skips
        self.check_spikes = training.check_for_spiky_loss
        self.factor = training.spiky_loss_factor
        self.rerun_spikes = training.check_for_spiky_loss and training.rerun_mode == "validate_results"
        self.recent = collections.deque(maxlen=SPIKE_WINDOW)
        self.in_a_row = 0

    def trouble(self, record: dict, fp16: bool) -> Optional[str]:
        """"nonfinite", "spike" or None for a step's record (losses and grad norm, the same on every rank)."""
        loss_ok, grad_ok = math.isfinite(record["loss"]), math.isfinite(record["grad_norm"])
        if self.check_nan and (not loss_ok or (not grad_ok and not fp16)):
            return "nonfinite"
        if (self.check_spikes and loss_ok and len(self.recent) >= SPIKE_MIN_HISTORY
                and record["loss"] > self.factor * self.mean()):
            return "spike"
        return None

    def mean(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))

    @staticmethod
    def locate(rerun: Callable[[], None], model, roots: list, rank: int) -> str:
        """Run the step again (`rerun`, on every rank) under a probe; where its first non-finite value was."""
        with NonFiniteProbe(model, rank, roots) as probe:
            rerun()
        found = [f for f in _everyone(probe.first()) if f is not None]
        if not found:
            return "not reproduced when the step ran again from the same state: a transient fault"
        return "first non-finite: " + min(found, key=Finding.order).describe()

    def spike(self, record: dict, micro_losses: list, samples: Optional[list]) -> str:
        """Which micro-batches carried a spike: every rank's per-micro-batch LM losses, the largest named."""
        rows = [(loss, where) for part in _everyone(list(zip(micro_losses, samples or [None] * len(micro_losses))))
                for loss, where in part if loss is not None]
        rows.sort(key=lambda r: -r[0])
        top = "; ".join(f"{loss:.3f}" + (f" (samples {where})" if where else "") for loss, where in rows[:3])
        return (f"loss {record['loss']:.4f} is {record['loss'] / self.mean():.1f}x the mean of the last "
                f"{len(self.recent)} steps ({self.mean():.4f}); largest micro-batch LM losses: {top}")

    def after(self, step: int, record: dict, last_checkpoint: Optional[str]) -> None:
        """Keep the history; stop the run after too many non-finite steps in a row."""
        if record.get("nonfinite_step"):
            self.in_a_row += 1
            if self.in_a_row > self.max_skips:
                kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "nothing was saved"
                raise TrainingError(
                    f"step {step}: a non-finite loss or gradient for {self.in_a_row} steps in a row (more than "
                    f"training.max_nonfinite_skips={self.max_skips}), stopping; {record['nonfinite']}; {kept}. "
                    "Lower --lr, check the data at these steps, or train in fp32 to find the cause")
            log.warning(f"step {step}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row, at most "
                        f"{self.max_skips}); {record['nonfinite']}", extra=ONCE)
            return
        self.in_a_row = 0
        if record.get("spike"):
            log.warning(f"step {step}: loss spike: {record['spike']}", extra=ONCE)
        if math.isfinite(record["loss"]):
            self.recent.append(record["loss"])

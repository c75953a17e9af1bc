"""Loss scaling for --fp16, with Megatron's rules and flags.

Written here because megatron-core's grad scalers keep their state in CUDA tensors (they do not run on the
CPU peer), and torch's GradScaler unscales per optimizer, which would miss the gradients that ZeRO-1 leaves
to other ranks' optimizers. The step itself (scale the loss, unscale the reduced gradients, skip the update
when their global norm is not finite) is in megamoe.training.trainer.train_step.
"""
from __future__ import annotations

from typing import Optional


class LossScaler:
    """The loss scale: constant (--loss-scale), or dynamic as megatron-core's DynamicGradScaler: halve it
    after `hysteresis` overflowing steps (not below --min-loss-scale), double it after --loss-scale-window
    steps in a row without one."""

    def __init__(self, initial: float, min_scale: float = 1.0, window: int = 1000, hysteresis: int = 2,
                 constant: Optional[float] = None):
        self.scale = float(constant if constant is not None else initial)
        self.dynamic = constant is None
        self.min_scale, self.window, self.hysteresis = float(min_scale), int(window), int(hysteresis)
        self.good_steps, self.hysteresis_left = 0, self.hysteresis

    @classmethod
    def from_config(cls, training) -> Optional["LossScaler"]:
        if not training.fp16:
            return None
        return cls(training.initial_loss_scale, training.min_loss_scale, training.loss_scale_window,
                   training.hysteresis, training.loss_scale)

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.good_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2, self.min_scale)
        else:
            self.good_steps += 1
            if self.good_steps == self.window:
                self.good_steps, self.hysteresis_left = 0, self.hysteresis
                self.scale *= 2

    def state_dict(self) -> dict:
        return dict(scale=self.scale, good_steps=self.good_steps, hysteresis_left=self.hysteresis_left)

    def load_state_dict(self, state: dict) -> None:
        if state and self.dynamic:
            self.scale, self.good_steps, self.hysteresis_left = (
                float(state["scale"]), int(state["good_steps"]), int(state["hysteresis_left"]))

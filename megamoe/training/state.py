"""What a resumed run needs besides model and optimizer: the train state every checkpoint holds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Step and data position of the run; handed to the checkpointer, which calls state_dict / load_state_dict."""

    step: int = 0
    consumed_train_samples: int = 0
    loss_scaler: dict = field(default_factory=dict)  # --fp16's dynamic loss scale (LossScaler.state_dict)
    skipped_steps: int = 0  # steps without an update (fp16 overflow, non-finite); the LR schedule counts the others
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (--check-for-nan-in-loss-and-grad)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Take the saved values; keys of older versions that no longer exist are dropped."""
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])

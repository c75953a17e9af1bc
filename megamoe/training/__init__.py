"""Training: the loop, one optimizer step, the optimizer and LR schedule, fp16 loss scaling, early exits, metrics."""
from megamoe.training.state import TrainState
from megamoe.training.step import MicroBatches, evaluate, make_runner, train_step
from megamoe.training.trainer import train

__all__ = ["MicroBatches", "TrainState", "evaluate", "make_runner", "train", "train_step"]

"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to min_lr (the paper's schedule)."""
import math

from megamoe.config import OptimizerConfig


def warmup_iters(opt: OptimizerConfig, train_iters: int) -> int:
    if opt.lr_warmup_iters is not None:
        return opt.lr_warmup_iters
    return int(round(opt.lr_warmup_fraction * train_iters))


def lr_at(step: int, opt: OptimizerConfig, train_iters: int) -> float:
    """LR for optimizer step `step` (0-based): warmup reaches lr at the end of warmup, then decays to
    min_lr (default 0.1 x lr) at train_iters and stays there."""
    min_lr = opt.min_lr if opt.min_lr is not None else 0.1 * opt.lr
    warmup = warmup_iters(opt, train_iters)
    if step < warmup:
        return opt.lr * (step + 1) / warmup
    if opt.lr_decay_style == "constant":
        return opt.lr
    decay_steps = max(1, train_iters - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if opt.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (opt.lr - min_lr)

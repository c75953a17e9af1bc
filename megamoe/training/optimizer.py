"""AdamW with the paper's settings; no weight decay on norms, biases, A_log and D.

apex's FusedAdam is used on CUDA when apex is importable, else torch's fused AdamW on CUDA, else
torch's AdamW (foreach) on CPU. `optimizer_backend()` names the choice for the start-up log.
"""
from __future__ import annotations

import torch

from megamoe.config import OptimizerConfig

NO_DECAY_SUFFIXES = ("A_log", ".D", "bias")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm weights and biases are 1-D; A_log is 2-D but is a log-timescale, not a weight to shrink.
    return param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(model: torch.nn.Module, weight_decay: float, keep=None) -> list:
    """decay / no_decay groups of the trainable parameters (those `keep(p)` accepts, when given)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and (keep is None or keep(p)):
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def optimizer_backend(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # noqa: F401
            return "apex FusedAdam"
        except ImportError:
            return "torch AdamW (fused)"
    return "torch AdamW (foreach)"


def build_optimizer(model: torch.nn.Module, opt: OptimizerConfig, device: torch.device,
                    keep=None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; `keep(p)` restricts it to some (ZeRO-1: the ones this rank owns)."""
    groups = param_groups(model, opt.weight_decay, keep)
    kwargs = dict(lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps)
    backend = optimizer_backend(device)
    if backend == "apex FusedAdam":
        from apex.optimizers import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=backend.endswith("(fused)"), foreach=None if device.type == "cuda"
                             else True, **kwargs)

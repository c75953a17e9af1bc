"""`causal_conv1d`: depthwise causal convolution with optional SiLU, dispatched by device.

CUDA tensors use the Triton kernel of `megamoe.kernels.causal_conv1d`; elsewhere PyTorch's conv1d, padded on
the left so position t sees only t - width + 1 .. t.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None) -> torch.Tensor:
    """x (batch, channels, L); weight (channels, width) or nn.Conv1d's (channels, 1, width); bias (channels,)."""
    if x.is_cuda:
        from megamoe.kernels.causal_conv1d import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, activation)
    weight = weight if weight.dim() == 3 else weight[:, None]
    y = F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(y) if activation in ("silu", "swish") else y

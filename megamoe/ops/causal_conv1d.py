"""`causal_conv1d`: depthwise causal convolution with optional SiLU, dispatched by device.

CUDA tensors use the Triton kernel of `megamoe.kernels.causal_conv1d`; elsewhere PyTorch's conv1d, padded on
the left so position t sees only t - width + 1 .. t. With seq_idx (packed documents) no tap reads across a
document start: as the sequence start, the positions before it read as zeros.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from megamoe.ops.seq_idx import check_seq_idx


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (batch, channels, L); weight (channels, width) or nn.Conv1d's (channels, 1, width); bias (channels,);
    seq_idx (batch, L) int32, the document index of packed rows."""
    if x.is_cuda:
        from megamoe.kernels.causal_conv1d import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, activation, seq_idx=seq_idx)
    weight = weight if weight.dim() == 3 else weight[:, None]
    width, length = weight.shape[-1], x.shape[-1]
    if seq_idx is None:
        y = F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :length]
    else:
        check_seq_idx(seq_idx, x.shape[0], length, "causal_conv1d")
        y = _PackedConv.apply(x, weight, bias, *_cross_taps(seq_idx, width))
    return F.silu(y) if activation in ("silu", "swish") else y


def _cross_taps(seq_idx: torch.Tensor, width: int) -> tuple:
    """The outputs that have a tap in another document: (row, step) of each, the step each of its taps reads
    (n, width) and which of them cross (n, width). Only the first width - 1 steps of a document have any."""
    # (batch, L + width - 1): the steps before the sequence count as its first document (they read as zeros)
    seq = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)
    cross = seq.unfold(1, width, 1) != seq_idx[..., None]  # (batch, L, width)
    rows, steps = cross.any(-1).nonzero(as_tuple=True)
    src = steps[:, None] + torch.arange(1 - width, 1, device=seq_idx.device)
    return rows, steps, src, cross[rows, steps] & (src >= 0)  # taps before the sequence read zeros anyway


class _PackedConv(torch.autograd.Function):
    """The causal conv of packed rows: the full conv (one fast kernel), minus the taps that read across a
    document start, subtracted at the few outputs that have them, forward and backward. Written as a Function so
    the corrections are small in-place updates (through autograd they would copy whole activations)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, steps, src, cross):
        width, length = weight.shape[-1], x.shape[-1]
        y = F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :length]
        if rows.numel():
            taps = x[rows[:, None], :, src.clamp(min=0)]  # (n, width, channels)
            y[rows, :, steps] -= (taps * cross[..., None] * weight[:, 0].t()).sum(1)
        ctx.save_for_backward(x, weight, rows, steps, src, cross)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rows, steps, src, cross = ctx.saved_tensors
        width = weight.shape[-1]
        padded = F.pad(grad, (0, width - 1))  # the conv made L + width - 1 outputs; the last ones were cut
        need_x, need_w = ctx.needs_input_grad[:2]
        dx, dw, _ = torch.ops.aten.convolution_backward(
            padded, x, weight, None, [1], [width - 1], [1], False, [0], x.shape[1], [need_x, need_w, False])
        if rows.numel():
            g = grad[rows, :, steps]  # (n, channels): the gradient of each corrected output
            if need_x:
                back = (g[:, None, :] * weight[:, 0].t())[cross]  # what each crossing tap handed back to its step
                dx.transpose(1, 2).index_put_((rows[:, None].expand_as(src)[cross], src[cross]), -back,
                                              accumulate=True)
            if need_w:
                taps = x[rows[:, None], :, src.clamp(min=0)]
                dw[:, 0] -= (g[:, None, :] * taps * cross[..., None]).sum(0).t()
        dbias = grad.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, dbias, None, None, None, None

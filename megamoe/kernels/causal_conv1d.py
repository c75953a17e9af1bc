"""Triton kernels for the Mamba-1 depthwise causal conv1d with the SiLU fused, forward and backward.

    y[b, d, t] = act(bias[d] + sum_j weight[d, j] * x[b, d, t - (width - 1) + j])      (x = 0 before t = 0)

With seq_idx (packed documents) a tap reads x only within the output's own document (zeros before its start),
and backward routes gradients the same way.

It saves, against `F.conv1d(..., padding=width-1, groups=d_inner)[..., :L]` then `F.silu`, the padded
output and the separate activation pass: one read of x and one write of y forward; backward recomputes the
pre-activation (width^2 cached loads) instead of storing it. A program owns a (BLOCK_D, BLOCK_L) tile;
dweight and dbias are per-tile partials summed in PyTorch (deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megamoe.kernels.launch import FP_FUSION, check_device, interpreting, next_pow2, on_device


@triton.jit
def _conv_tap(x_ptrs, seq_ptrs, t, shift, mask_d, seqlen, HAS_SEQ: tl.constexpr):
    # x at time t + shift, zero outside [0, seqlen) and (with seq_idx) outside the document of time t
    src = t + shift
    ok = (src >= 0) & (src < seqlen)
    if HAS_SEQ:
        sid = tl.load(seq_ptrs + t, mask=t < seqlen, other=0)
        ok = ok & (tl.load(seq_ptrs + src, mask=ok, other=0) == sid)
    return tl.load(x_ptrs + src[None, :], mask=mask_d[:, None] & ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_pre(x_ptrs, seq_ptrs, w_ptr, bias, offs_d, mask_d, t, seqlen, WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr):
    # pre-activation at times t: bias + sum_j w_j x_{t - (WIDTH-1) + j}
    acc = tl.zeros((offs_d.shape[0], t.shape[0]), tl.float32) + bias[:, None]
    for j in tl.static_range(WIDTH):
        w_j = tl.load(w_ptr + offs_d * WIDTH + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += w_j[:, None] * _conv_tap(x_ptrs, seq_ptrs, t, j - (WIDTH - 1), mask_d, seqlen, HAS_SEQ)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, y_ptr, d_inner, seqlen, s_x_b, s_x_d, s_seq_b,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < d_inner
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_ptrs = x_ptr + pid_b * s_x_b + offs_d[:, None] * s_x_d
    y = _conv_pre(x_ptrs, seq_ptr + pid_b * s_seq_b, w_ptr, bias, offs_d, mask_d, t, seqlen, WIDTH, HAS_SEQ)
    if SILU:
        y = y * tl.sigmoid(y)
    mask = mask_d[:, None] & (t < seqlen)[None, :]
    tl.store(y_ptr + (pid_b * d_inner + offs_d[:, None]) * seqlen + t[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, dy_ptr, dx_ptr, dw_ptr, dbias_ptr, d_inner, seqlen, s_x_b,
                     s_x_d, s_seq_b,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr,
                     HAS_SEQ: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # dy, dx: contiguous like y; dw: (n_tiles_l, batch, d_inner, WIDTH) and dbias: (n_tiles_l, batch, d_inner)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(2)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < d_inner
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_ptrs = x_ptr + pid_b * s_x_b + offs_d[:, None] * s_x_d
    seq_ptrs = seq_ptr + pid_b * s_seq_b
    dy_ptrs = dy_ptr + (pid_b * d_inner + offs_d[:, None]) * seqlen
    dx = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    g0 = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    # dx_t = sum_j w_j g_{t + (WIDTH-1) - j}, g = dy * act'(pre): g is needed at times t .. t + WIDTH - 1
    for k in tl.static_range(WIDTH):
        g = _conv_tap(dy_ptrs, seq_ptrs, t, k, mask_d, seqlen, HAS_SEQ)  # outputs of x_t's own document only
        if SILU:
            pre = _conv_pre(x_ptrs, seq_ptrs, w_ptr, bias, offs_d, mask_d, t + k, seqlen, WIDTH, HAS_SEQ)
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        w_k = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 1 - k), mask=mask_d, other=0.0).to(tl.float32)
        dx += w_k[:, None] * g
        if k == 0:
            g0 = g
    mask = mask_d[:, None] & (t < seqlen)[None, :]
    tl.store(dx_ptr + (pid_b * d_inner + offs_d[:, None]) * seqlen + t[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask)
    offs_w = tl.arange(0, WIDTH_P2)
    dw = tl.zeros((BLOCK_D, WIDTH_P2), tl.float32)
    for j in tl.static_range(WIDTH):
        tap = tl.sum(g0 * _conv_tap(x_ptrs, seq_ptrs, t, j - (WIDTH - 1), mask_d, seqlen, HAS_SEQ), axis=1)
        dw += tl.where(offs_w[None, :] == j, tap[:, None], 0.0)
    row = (pid_l * tl.num_programs(0) + pid_b) * d_inner + offs_d
    tl.store(dw_ptr + row[:, None] * WIDTH + offs_w[None, :], dw, mask=mask_d[:, None] & (offs_w < WIDTH)[None, :])
    tl.store(dbias_ptr + row, tl.sum(g0, axis=1), mask=mask_d)


def _tiles(kernel, d_inner: int, seqlen: int):
    if interpreting(kernel):
        return min(4, next_pow2(d_inner)), min(16, next_pow2(seqlen)), 4
    return min(16, next_pow2(d_inner)), min(128, next_pow2(seqlen)), 4


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, seq_idx):
        batch, d_inner, seqlen = x.shape
        width = weight.shape[1]
        block_d, block_l, warps = _tiles(_conv_fwd_kernel, d_inner, seqlen)
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        b = bias if bias is not None else weight
        seq = seq_idx if seq_idx is not None else weight
        grid = (batch, triton.cdiv(d_inner, block_d), triton.cdiv(seqlen, block_l))
        _conv_fwd_kernel[grid](x, weight, b, seq, y, d_inner, seqlen, x.stride(0), x.stride(1), seq.stride(0),
                               HAS_BIAS=bias is not None, SILU=silu, WIDTH=width, HAS_SEQ=seq_idx is not None,
                               BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps, **FP_FUSION)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        batch, d_inner, seqlen = x.shape
        width = weight.shape[1]
        block_d, block_l, warps = _tiles(_conv_bwd_kernel, d_inner, seqlen)
        n_l = triton.cdiv(seqlen, block_l)
        dy = dy.contiguous()
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw = torch.empty(n_l, batch, d_inner, width, device=x.device, dtype=torch.float32)
        dbias = torch.empty(n_l, batch, d_inner, device=x.device, dtype=torch.float32)
        b = bias if bias is not None else weight
        seq = seq_idx if seq_idx is not None else weight
        _conv_bwd_kernel[(batch, triton.cdiv(d_inner, block_d), n_l)](
            x, weight, b, seq, dy, dx, dw, dbias, d_inner, seqlen, x.stride(0), x.stride(1), seq.stride(0),
            HAS_BIAS=bias is not None, SILU=ctx.silu, WIDTH=width, WIDTH_P2=next_pow2(width),
            HAS_SEQ=seq_idx is not None, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps, **FP_FUSION)
        dbias = dbias.sum((0, 1)).to(bias.dtype) if bias is not None else None
        return dx, dw.sum((0, 1)).to(weight.dtype), dbias, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         activation: Optional[str] = None, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise causal conv1d as causal_conv1d_fn: x (batch, d_inner, L); weight (d_inner, width) or
    nn.Conv1d's (d_inner, 1, width); bias (d_inner,); activation None or "silu"/"swish"; seq_idx (batch, L)
    int32 document index (its order is megamoe.ops's to check). Returns (batch, d_inner, L) in x's dtype;
    differentiable in x, weight and bias."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_triton: activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)  # a view: autograd maps the gradient back to nn.Conv1d's shape
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_triton: x must be (batch, d_inner, L) and weight (d_inner, width), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv1d_triton: bias must be ({x.shape[1]},), got {tuple(bias.shape)}")
    if seq_idx is not None and (seq_idx.dtype != torch.int32 or tuple(seq_idx.shape) != (x.shape[0], x.shape[2])):
        raise ValueError(f"causal_conv1d_triton: seq_idx must be int32 of shape (batch, L) = "
                         f"{(x.shape[0], x.shape[2])}, got {seq_idx.dtype} {tuple(seq_idx.shape)}")
    check_device(_conv_fwd_kernel, "causal_conv1d_triton", x, weight, bias, seq_idx)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    with on_device(x.device):
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        return CausalConv1dFn.apply(x, weight, bias, activation is not None, seq_idx)

"""Triton kernel for one recurrent step of the Mamba-1 scan (generation), in place on the state.

    state <- exp(dt * A) * state + dt * B * x;   y = <state, C> + D * x,  then y * silu(z)

A program owns one batch row and BLOCK_D channels x all of d_state (padded to BLOCK_N); fp32 arithmetic,
the state is stored back in its own dtype. Inference only: no autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megamoe.kernels.launch import FP_FUSION, check_device, interpreting, next_pow2, on_device
from megamoe.kernels.selective_scan import MAX_D_STATE, _softplus


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    d_inner, d_state,
    s_st_b, s_st_d, s_st_n, s_x_b, s_dt_b, s_z_b, s_B_b, s_C_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    st_ptrs = state_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :] * s_st_n
    state = tl.load(st_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + pid_b * s_B_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * s_C_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    state = tl.exp(dt[:, None] * A) * state + (dt * x)[:, None] * B[None, :]
    tl.store(st_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * d_inner + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                                  z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                                  dt_softplus: bool = False) -> torch.Tensor:
    """state: (batch, d_inner, d_state), updated in place; x, dt, z: (batch, d_inner); A: (d_inner, d_state);
    B, C: (batch, d_state); D, dt_bias: (d_inner,). Returns y (batch, d_inner) in x's dtype."""
    batch, d_inner, d_state = state.shape
    expected = {"x": (x, (batch, d_inner)), "dt": (dt, (batch, d_inner)), "A": (A, (d_inner, d_state)),
                "B": (B, (batch, d_state)), "C": (C, (batch, d_state)), "D": (D, (d_inner,)),
                "z": (z, (batch, d_inner)), "dt_bias": (dt_bias, (d_inner,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update_triton: {name} must have shape {shape} for a state of "
                             f"shape {tuple(state.shape)}, got {tuple(t.shape)}")
    if d_state > MAX_D_STATE:
        raise ValueError(f"selective_state_update_triton: d_state={d_state} > {MAX_D_STATE}")
    check_device(_state_update_kernel, "selective_state_update_triton", state, x, dt, A, B, C, D, z, dt_bias)
    # the channel vectors are read with unit stride; copy the rare non-contiguous one
    x, dt, z, B, C = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, dt, z, B, C))
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    y = torch.empty(batch, d_inner, device=x.device, dtype=x.dtype)
    block_n = max(next_pow2(d_state), 2)
    block_d = min(max(512 // block_n, 4), next_pow2(d_inner))  # about 512 state elements per program
    if interpreting(_state_update_kernel):
        block_d = min(block_d, 4)
    zz = z if z is not None else x
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    with on_device(x.device):
        _state_update_kernel[(batch, triton.cdiv(d_inner, block_d))](
            state, x, dt, A, B, C, D if D is not None else dummy, zz, dt_bias if dt_bias is not None else dummy,
            y, d_inner, d_state, state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0),
            zz.stride(0), B.stride(0), C.stride(0),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4, **FP_FUSION)
    return y

"""`selective_state_update`: one recurrent step of the Mamba-1 scan, for generation (mamba_ssm's signature).

    state <- exp(dt * A) * state + dt * B * x;   y = <state, C> + D * x,  then y * silu(z)

CUDA tensors use the Triton kernel of `megamoe.kernels.selective_state_update`; elsewhere the PyTorch
`selective_state_update_ref`. Updates `state` in place.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                               z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                               dt_softplus: bool = False) -> torch.Tensor:
    """state: (batch, d_inner, d_state); x, dt, z: (batch, d_inner); A: (d_inner, d_state);
    B, C: (batch, d_state); D, dt_bias: (d_inner,). Returns y (batch, d_inner) in x's dtype."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[..., None] * A.float())
    dtx, B = (dt * x.float())[..., None], B.float()[:, None, :]
    if state.dtype == torch.float32:  # in place: the state is read and written once
        new_state = state.mul_(dA).addcmul_(dtx, B)
    else:
        new_state = torch.addcmul(state.float() * dA, dtx, B)
        state.copy_(new_state)
    y = torch.matmul(new_state, C.float()[..., None])[..., 0]
    if D is not None:
        y = torch.addcmul(y, x.float(), D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Dispatch by device; see selective_state_update_ref for shapes."""
    if x.is_cuda:
        from megamoe.kernels.selective_state_update import selective_state_update_triton
        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

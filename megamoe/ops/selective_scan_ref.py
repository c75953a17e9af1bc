"""The Mamba-1 selective scan, written as the plain sequential recurrence: the reference for tests.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, d_inner, d_state)
    y_t = <h_t, C_t> + D * u_t,   then   y_t * silu(z_t)

With seq_idx (batch, L), the state restarts from zero where a packed row's document index changes (the decay
into that step is cut). Slow (one autograd node per step) but obviously right; the fast scans are held against it.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from megamoe.ops.seq_idx import check_seq_idx, document_starts


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, seq_idx: Optional[torch.Tensor] = None,
                       initial_state: Optional[torch.Tensor] = None):
    """u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); seq_idx: (batch, L) int32; initial_state (batch, d_inner, d_state): the state
    before step 0 (default zeros). Returns y (batch, d_inner, L) [and the last state
    (batch, d_inner, d_state)]. Computes in float32 (float64 for float64 inputs) and returns u's dtype, as
    mamba_ssm does."""
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if seq_idx is not None:
        check_seq_idx(seq_idx, batch, length, "selective_scan_ref")
        deltaA = deltaA * (~document_starts(seq_idx)).to(compute)[:, None, :, None]
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.to(compute)
    ys = []
    for t in range(length):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(compute)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y

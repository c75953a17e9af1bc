"""`selective_scan`: one entry point, mamba_ssm's signature, the fastest path for the tensors' device.

- CUDA tensors: the Triton kernels of `megamoe.kernels.selective_scan` (states kept on chip, chunked).
- CPU tensors: the chunked PyTorch scan of `megamoe.ops.scan_cpu` (custom backward, no per-step graph).
`selective_scan_ref` is the plain sequential recurrence both are tested against.
"""
from typing import Optional

import torch

from megamoe.ops import scan_cpu


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, seq_idx: Optional[torch.Tensor] = None,
                   initial_state: Optional[torch.Tensor] = None):
    """u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); seq_idx: (batch, L) int32 document index of packed rows (the state restarts
    from zero where it changes); initial_state (batch, d_inner, d_state) fp32: the state before step 0 (context
    parallelism hands each rank its slice's). Returns y (batch, d_inner, L) in u's dtype [and the last state
    (batch, d_inner, d_state) in float32, that of each row's last document]. Differentiable in every tensor
    input. seq_idx's order is checked on CPU tensors (on a GPU that would wait for the device; MambaLM checks it
    once per forward)."""
    if u.is_cuda:  # Triton is imported on the first CUDA call (TRITON_INTERPRET is read at its import)
        from megamoe.kernels.selective_scan import selective_scan_triton
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     seq_idx=seq_idx, initial_state=initial_state)
    return scan_cpu.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                       seq_idx=seq_idx, initial_state=initial_state)

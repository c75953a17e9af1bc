"""Triton kernels for the Mamba-1 selective scan, forward and backward, with mamba_ssm's semantics.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, d_inner, d_state)
    y_t = <h_t, C_t> + D * u_t,   then   y_t * silu(z_t)

With seq_idx (packed documents) the decay into a step where the document index changes is zero, in the forward
scan, the recomputed states and the adjoint alike: the state restarts and no gradient crosses the boundary.

Forward: a program owns (one batch row, BLOCK_D channels, all of d_state padded to BLOCK_N) and walks the
sequence in blocks of BLOCK_L: the block's recurrence is a `tl.associative_scan` over time, the state crosses
blocks in registers, and the state entering every chunk of CHUNK_L steps is saved for backward.
Backward: walks the chunks in reverse, recomputes a chunk's states from its saved entry state, and carries
the adjoint state between chunks. dB and dC sum over channels: a program owns GROUP_D channels (a loop over
BLOCK_D sub-blocks) and writes one partial per group, summed in PyTorch (deterministic, no atomics).
All arithmetic is float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from megamoe.kernels.launch import FP_FUSION, check_device, interpreting, next_pow2, on_device, sm_count, tuned

MAX_D_STATE = 64
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _softplus(x):
    # log(1 + e^x), linear above 20 as torch's softplus; the clamp keeps the unused branch finite
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _compose(a_l, x_l, a_r, x_r):
    # h -> a_l h + x_l, then h -> a_r h + x_r (l earlier in time than r)
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _compose_adjoint(a_r, p_r, w_r, a_l, p_l, w_l):
    # Reverse scan (later segment r first) of g_t = c_t + a_{t+1} g_{t+1} without shifting a by one step:
    # a segment [i..j] keeps (a_i, prod a_{i+1..j}, sum_s prod a_{i+1..s} c_s).
    return a_l, p_l * a_r * p_r, w_l + p_l * a_r * w_r


@triton.jit
def _load_dt(delta_ptrs, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta -> (delta + bias) -> softplus, fp32; 0 where masked so padded steps are the identity."""
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_channels(ptr, offs_d, mask_d, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
    """A per-channel vector (delta_bias or D) in fp32, zeros when the input is absent."""
    v = tl.zeros((BLOCK_D,), tl.float32)
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return v


@triton.jit
def _cut_decay(a, seq_ptrs, t, mask_t, HAS_SEQ: tl.constexpr):
    """a (BLOCK_D, BLOCK_N, steps) with the decay into every step that starts a new document set to zero."""
    if HAS_SEQ:
        sid = tl.load(seq_ptrs + t, mask=mask_t, other=0)
        prev = tl.load(seq_ptrs + t - 1, mask=mask_t & (t > 0), other=0)
        a = tl.where(((sid != prev) & (t > 0))[None, None, :], 0.0, a)
    return a


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, h0_ptr, y_ptr, states_ptr, last_ptr,
    d_inner, d_state, seqlen, n_chunks,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_y_b, s_y_d, s_B_b, s_B_n, s_C_b, s_C_n, s_seq_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_LAST: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < d_inner
    mask_dn = mask_d[:, None] & (offs_n < d_state)[None, :]
    # (BLOCK_D, BLOCK_N): A in log2 units so that exp(delta * A) = exp2(delta * A2)
    A2 = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = _load_channels(bias_ptr, offs_d, mask_d, HAS_BIAS, BLOCK_D)
    Dv = _load_channels(D_ptr, offs_d, mask_d, HAS_D, BLOCK_D)
    u_ptrs = u_ptr + pid_b * s_u_b + offs_d[:, None] * s_u_d
    dt_ptrs = delta_ptr + pid_b * s_dt_b + offs_d[:, None] * s_dt_d
    z_ptrs = z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d
    y_ptrs = y_ptr + pid_b * s_y_b + offs_d[:, None] * s_y_d
    B_ptrs = B_ptr + pid_b * s_B_b + offs_n[:, None] * s_B_n
    C_ptrs = C_ptr + pid_b * s_C_b + offs_n[:, None] * s_C_n
    # states: (batch, d_inner, n_chunks, d_state) fp32
    st_ptrs = states_ptr + ((pid_b * d_inner + offs_d[:, None]) * n_chunks) * d_state + offs_n[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if HAS_H0:  # (batch, d_inner, d_state) fp32: the state before step 0
        h = tl.load(h0_ptr + (pid_b * d_inner + offs_d[:, None]) * d_state + offs_n[None, :], mask=mask_dn, other=0.0)
    for blk in range(0, tl.cdiv(seqlen, BLOCK_L)):
        t0 = blk * BLOCK_L
        if SAVE_STATES:
            if t0 % CHUNK_L == 0:
                tl.store(st_ptrs + (t0 // CHUNK_L) * d_state, h, mask=mask_dn)
        t = t0 + offs_l
        mask_t = t < seqlen
        m2 = mask_d[:, None] & mask_t[None, :]
        mask_nt = (offs_n < d_state)[:, None] & mask_t[None, :]
        u = tl.load(u_ptrs + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt, _ = _load_dt(dt_ptrs + t[None, :], bias, m2, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptrs + t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptrs + t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        # (BLOCK_D, BLOCK_N, BLOCK_L): per-step decay and input, scanned over time
        a = _cut_decay(tl.exp2(dt[:, None, :] * A2[:, :, None]), seq_ptr + pid_b * s_seq_b, t, mask_t, HAS_SEQ)
        x = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_compose)
        hs = a_cum * h[:, :, None] + x_cum
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        # padded steps are the identity, so the last lane holds the state after the last real step
        h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            zt = tl.load(z_ptrs + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(y_ptrs + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
    if SAVE_LAST:
        tl.store(last_ptr + (pid_b * d_inner + offs_d[:, None]) * d_state + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, dout_ptr, states_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, acc_ptr,
    d_inner, d_state, seqlen, n_chunks,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_do_b, s_do_d, s_B_b, s_B_n, s_C_b, s_C_n, s_seq_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_L: tl.constexpr, GROUP_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # du, ddelta, dz: like u (contiguous); dB, dC: (n_groups, batch, d_state, seqlen) fp32 partials;
    # acc: (4, batch, d_inner, BLOCK_N) fp32 scratch: adjoint carry, dA, dD, ddelta_bias per channel.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    n_batch = tl.num_programs(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, CHUNK_L)
    mask_n = offs_n < d_state
    B_ptrs = B_ptr + pid_b * s_B_b + offs_n[:, None] * s_B_n
    C_ptrs = C_ptr + pid_b * s_C_b + offs_n[:, None] * s_C_n
    part = (pid_g * n_batch + pid_b) * d_state * seqlen + offs_n[:, None] * seqlen
    acc_stride = n_batch * d_inner * BLOCK_N
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        t = c * CHUNK_L + offs_l
        mask_t = t < seqlen
        mask_nt = mask_n[:, None] & mask_t[None, :]
        Bt = tl.load(B_ptrs + t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptrs + t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        dB_acc = tl.zeros((BLOCK_N, CHUNK_L), tl.float32)
        dC_acc = tl.zeros((BLOCK_N, CHUNK_L), tl.float32)
        for s in range(0, GROUP_D // BLOCK_D):
            # the per-channel accumulators below were stored by other threads of this program
            tl.debug_barrier()
            offs_d = pid_g * GROUP_D + s * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d_inner
            mask_dn = mask_d[:, None] & mask_n[None, :]
            m2 = mask_d[:, None] & mask_t[None, :]
            A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
            bias = _load_channels(bias_ptr, offs_d, mask_d, HAS_BIAS, BLOCK_D)
            Dv = _load_channels(D_ptr, offs_d, mask_d, HAS_D, BLOCK_D)
            acc_ptrs = acc_ptr + (pid_b * d_inner + offs_d[:, None]) * BLOCK_N + offs_n[None, :]
            # acc is uninitialised memory: the first chunk walked (ci == 0) starts every accumulator at zero
            acc_dn = mask_dn & (ci > 0)
            carry = tl.load(acc_ptrs, mask=acc_dn, other=0.0)  # a_{t1} * adjoint of h_{t1}, t1 = next chunk
            if HAS_DLAST:
                if ci == 0:
                    carry += tl.load(dlast_ptr + (pid_b * d_inner + offs_d[:, None]) * d_state + offs_n[None, :],
                                     mask=mask_dn, other=0.0)
            h0 = tl.load(states_ptr + ((pid_b * d_inner + offs_d[:, None]) * n_chunks + c) * d_state
                         + offs_n[None, :], mask=mask_dn, other=0.0)
            u = tl.load(u_ptr + pid_b * s_u_b + offs_d[:, None] * s_u_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
            row_o = (pid_b * d_inner + offs_d[:, None]) * seqlen + t[None, :]  # du, ddelta, dz are contiguous
            dt, raw = _load_dt(delta_ptr + pid_b * s_dt_b + offs_d[:, None] * s_dt_d + t[None, :], bias, m2,
                               HAS_BIAS, SOFTPLUS)
            dout = tl.load(dout_ptr + pid_b * s_do_b + offs_d[:, None] * s_do_d + t[None, :],
                           mask=m2, other=0.0).to(tl.float32)
            # recompute the chunk's states from the saved entry state
            a = _cut_decay(tl.exp2(dt[:, None, :] * (A * LOG2E)[:, :, None]), seq_ptr + pid_b * s_seq_b, t, mask_t,
                           HAS_SEQ)
            x = (dt * u)[:, None, :] * Bt[None, :, :]
            a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_compose)
            h = a_cum * h0[:, :, None] + x_cum
            dy = dout
            if HAS_Z:
                row_z = pid_b * s_z_b + offs_d[:, None] * s_z_d + t[None, :]
                zt = tl.load(z_ptr + row_z, mask=m2, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[None, :, :], axis=1) + u * Dv[:, None]
                sig = tl.sigmoid(zt)
                tl.store(dz_ptr + row_o, (dout * y * sig * (1.0 + zt * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=m2)
                dy = dout * zt * sig
            # adjoint of h_t: g_t = dy_t C_t + a_{t+1} g_{t+1}, by a reverse scan, plus the carry from later
            cvec = dy[:, None, :] * Ct[None, :, :]
            _, p_cum, w_cum = tl.associative_scan((a, tl.full(a.shape, 1.0, tl.float32), cvec), axis=2,
                                                  combine_fn=_compose_adjoint, reverse=True)
            m3 = m2[:, None, :] & mask_n[None, :, None]
            g = tl.where(m3, w_cum + p_cum * carry[:, :, None], 0.0)
            carry = tl.sum(tl.where(offs_l[None, None, :] == 0, a * g, 0.0), axis=2)
            ga = g * (h - x)  # g_t * a_t * h_{t-1}: the gradient through the decay
            gB = tl.sum(g * Bt[None, :, :], axis=1)
            ddt = gB * u + tl.sum(ga * A[:, :, None], axis=1)
            if SOFTPLUS:
                ddt *= tl.sigmoid(raw)
            ddt = tl.where(m2, ddt, 0.0)
            tl.store(du_ptr + row_o, (dy * Dv[:, None] + gB * dt).to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + row_o, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
            dB_acc += tl.sum(g * (dt * u)[:, None, :], axis=0)
            dC_acc += tl.sum(dy[:, None, :] * h, axis=0)
            # per-channel accumulators (carry, dA, dD, ddelta_bias) live in acc between chunks
            dA = tl.load(acc_ptrs + acc_stride, mask=acc_dn, other=0.0) + tl.sum(ga * dt[:, None, :], axis=2)
            d_ptrs = acc_ptr + 2 * acc_stride + (pid_b * d_inner + offs_d) * BLOCK_N  # column 0 of planes 2, 3
            dD = tl.load(d_ptrs, mask=mask_d & (ci > 0), other=0.0) + tl.sum(dy * u, axis=1)
            dbias = tl.load(d_ptrs + acc_stride, mask=mask_d & (ci > 0), other=0.0) + tl.sum(ddt, axis=1)
            tl.store(acc_ptrs, carry, mask=mask_dn)
            tl.store(acc_ptrs + acc_stride, dA, mask=mask_dn)
            tl.store(d_ptrs, dD, mask=mask_d)
            tl.store(d_ptrs + acc_stride, dbias, mask=mask_d)
        tl.store(dB_ptr + part + t[None, :], dB_acc, mask=mask_nt)
        tl.store(dC_ptr + part + t[None, :], dC_acc, mask=mask_nt)


def _fwd_configs(block_n: int, chunk_len: int) -> List[triton.Config]:
    """Forward tiles (BLOCK_D, BLOCK_N, BLOCK_L) of 2K-8K fp32 elements, BLOCK_L dividing the chunk.
    Larger tiles spilled registers when compiled for sm_90 (ptxas -v)."""
    configs = []
    for block_d in (1, 2, 4, 8, 16):
        for block_l in (32, 64):
            size = block_d * block_n * block_l
            if chunk_len % block_l == 0 and 2048 <= size <= 8192:
                configs.append(triton.Config({"BLOCK_D": block_d, "BLOCK_L": block_l},
                                             num_warps=4 if size <= 4096 else 8))
    return configs or [triton.Config({"BLOCK_D": 1, "BLOCK_L": chunk_len}, num_warps=4)]


def _bwd_configs(block_n: int, chunk_len: int, group_d: int) -> List[triton.Config]:
    """Backward tiles (BLOCK_D, BLOCK_N, CHUNK_L): about ten fp32 tiles are live, so at most 8 elements per
    thread (16 at 8 warps for d_state <= 16); the others spilled when compiled for sm_90."""
    configs = []
    for block_d in (1, 2, 4):
        for warps in (4, 8):
            per_thread = block_d * block_n * chunk_len // (32 * warps)
            if group_d % block_d == 0 and (per_thread <= 8 or (warps == 8 and block_n <= 16 and per_thread <= 16)):
                configs.append(triton.Config({"BLOCK_D": block_d}, num_warps=warps))
    return configs or [triton.Config({"BLOCK_D": 1}, num_warps=8)]


def default_chunk_len(d_state: int) -> int:
    """Steps between saved states: 64, or 32 above d_state 32 where a 64-step backward tile spills."""
    return 64 if d_state <= 32 else 32


def _group_d(batch: int, d_inner: int, device: torch.device) -> int:
    """Channels per backward program: large groups mean fewer dB/dC partials, small ones more programs.
    Aim for about four programs per SM."""
    per_program = max(1, batch * d_inner // (4 * sm_count(device)))
    return min(max(next_pow2(per_program), 8), 256)


def _check(u, delta, A, B, C, D, z, delta_bias, seq_idx=None, initial_state=None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan_triton: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[-1]
    expected = {"delta": (delta, (batch, d_inner, seqlen)), "A": (A, (d_inner, d_state)),
                "B": (B, (batch, d_state, seqlen)), "C": (C, (batch, d_state, seqlen)),
                "D": (D, (d_inner,)), "z": (z, (batch, d_inner, seqlen)), "delta_bias": (delta_bias, (d_inner,)),
                "seq_idx": (seq_idx, (batch, seqlen)), "initial_state": (initial_state, (batch, d_inner, d_state))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan_triton: {name} must have shape {shape} (batch, d_inner, L = "
                             f"{batch}, {d_inner}, {seqlen}; d_state = {d_state}), got {tuple(t.shape)}")
    if seq_idx is not None and seq_idx.dtype != torch.int32:  # its order is checked by megamoe.ops.selective_scan
        raise ValueError(f"selective_scan_triton: seq_idx must be int32, got {seq_idx.dtype}")
    if d_state > MAX_D_STATE:
        raise ValueError(f"selective_scan_triton: d_state={d_state} > {MAX_D_STATE}: the state is kept in "
                         "registers; use a smaller d_state or megamoe.ops.selective_scan_ref")
    if seqlen == 0:
        raise ValueError("selective_scan_triton: empty sequence (L = 0)")


def _last_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # the kernels take strides for batch and channel; time (and d_state of A) must be contiguous
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, save_states, save_last, chunk_len, seq_idx=None, h0=None):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    block_n = max(next_pow2(d_state), 2)
    n_chunks = triton.cdiv(seqlen, chunk_len)
    y = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    dummy = torch.empty(1, device=u.device, dtype=torch.float32)
    states = (torch.empty(batch, d_inner, n_chunks, d_state, device=u.device, dtype=torch.float32)
              if save_states else None)
    last = torch.empty(batch, d_inner, d_state, device=u.device, dtype=torch.float32) if save_last else None
    zz = z if z is not None else u
    seq = seq_idx if seq_idx is not None else dummy
    args = (u, delta, A, B, C, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
            seq, h0 if h0 is not None else dummy, y, states if save_states else dummy, last if save_last else dummy,
            d_inner, d_state, seqlen, n_chunks,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            y.stride(0), y.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1), seq.stride(0))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                 HAS_SEQ=seq_idx is not None, HAS_H0=h0 is not None, SAVE_STATES=save_states, SAVE_LAST=save_last,
                 CHUNK_L=chunk_len, BLOCK_N=block_n)
    if interpreting(_scan_fwd_kernel):
        block_d = min(4, next_pow2(d_inner))
        block_l = max(chunk_len // 2, 1)  # two blocks per chunk exercise the save-on-chunk-start path
        _scan_fwd_kernel[(batch, triton.cdiv(d_inner, block_d))](*args, **flags, **FP_FUSION, BLOCK_D=block_d,
                                                                 BLOCK_L=block_l)
    else:
        kernel = tuned(_scan_fwd_kernel, (block_n, chunk_len), _fwd_configs(block_n, chunk_len),
                       key=["d_inner", "d_state", "seqlen"])
        kernel[lambda meta: (batch, triton.cdiv(d_inner, meta["BLOCK_D"]))](*args, **flags, **FP_FUSION)
    return y, states, last


def _bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states, softplus, chunk_len, group_d=None,
         seq_idx=None):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    block_n = max(next_pow2(d_state), 2)
    n_chunks = states.shape[2]
    interpret = interpreting(_scan_bwd_kernel)
    if group_d is None:
        group_d = 4 if interpret else _group_d(batch, d_inner, u.device)
    n_groups = triton.cdiv(d_inner, group_d)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(u.shape, device=u.device, dtype=delta.dtype)
    dz = torch.empty(u.shape, device=u.device, dtype=z.dtype) if z is not None else None
    dB_part = torch.empty(n_groups, batch, d_state, seqlen, **f32)
    dC_part = torch.empty(n_groups, batch, d_state, seqlen, **f32)
    acc = torch.empty(4, batch, d_inner, block_n, **f32)  # adjoint carry, dA, dD, ddelta_bias
    if interpret:
        acc.fill_(float("nan"))  # poison: the tests then prove the kernel initialises it
    dummy = torch.empty(1, **f32)
    zz = z if z is not None else u
    seq = seq_idx if seq_idx is not None else dummy
    args = (u, delta, A, B, C, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
            seq, dout, states, dlast if dlast is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dB_part, dC_part, acc,
            d_inner, d_state, seqlen, n_chunks,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            dout.stride(0), dout.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1), seq.stride(0))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                 HAS_SEQ=seq_idx is not None, HAS_DLAST=dlast is not None, BLOCK_N=block_n, CHUNK_L=chunk_len,
                 GROUP_D=group_d)
    grid = (batch, n_groups)
    if interpret:
        _scan_bwd_kernel[grid](*args, **flags, **FP_FUSION, BLOCK_D=min(2, group_d))
    else:
        kernel = tuned(_scan_bwd_kernel, (block_n, chunk_len, group_d), _bwd_configs(block_n, chunk_len, group_d),
                       key=["d_inner", "d_state", "seqlen"])
        kernel[grid](*args, **flags, **FP_FUSION)
    dh0 = acc[0, :, :, :d_state]  # the adjoint carried past the first step: the gradient of the initial state
    dA = acc[1].sum(0)[:, :d_state].to(A.dtype)
    dD = acc[2, :, :, 0].sum(0).to(D.dtype) if D is not None else None
    dbias = acc[3, :, :, 0].sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype), dD, dz, dbias, dh0


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: forward saves the chunk-entry states, backward recomputes from them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_len, save,
                seq_idx, h0):
        u, delta, B, C, z, seq_idx = map(_last_contiguous, (u, delta, B, C, z, seq_idx))
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        h0 = h0.float().contiguous() if h0 is not None else None
        y, states, last = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save, return_last_state,
                               chunk_len, seq_idx, h0)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, seq_idx)
            ctx.has_h0 = h0 is not None
            ctx.softplus, ctx.chunk_len = delta_softplus, chunk_len
        return (y, last) if return_last_state else y

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, states, seq_idx = ctx.saved_tensors
        dout = _last_contiguous(dout)
        dlast = dlast.float().contiguous() if dlast is not None else None
        *grads, dh0 = _bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states, ctx.softplus, ctx.chunk_len,
                           seq_idx=seq_idx)
        return (*grads, None, None, None, None, None, dh0 if ctx.has_h0 else None)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                          delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                          return_last_state: bool = False, *, chunk_len: Optional[int] = None,
                          seq_idx: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None):
    """mamba_ssm's selective_scan_fn on Triton. u, delta, z: (batch, d_inner, L); A: (d_inner, d_state);
    B, C: (batch, d_state, L); D, delta_bias: (d_inner,); seq_idx: (batch, L) int32 document index (the state
    restarts where it changes); initial_state (batch, d_inner, d_state): the state before step 0. Returns y
    (batch, d_inner, L) in u's dtype [and the last state (batch, d_inner, d_state) in float32]; differentiable in
    every tensor input. `chunk_len` (a power of two, default `default_chunk_len(d_state)`) spaces the states saved
    for backward."""
    _check(u, delta, A, B, C, D, z, delta_bias, seq_idx, initial_state)
    chunk_len = default_chunk_len(A.shape[1]) if chunk_len is None else chunk_len
    check_device(_scan_fwd_kernel, "selective_scan_triton", u, delta, A, B, C, D, z, delta_bias, seq_idx,
                 initial_state)
    if chunk_len < 1 or chunk_len & (chunk_len - 1):
        raise ValueError(f"selective_scan_triton: chunk_len must be a power of two, got {chunk_len}")
    # save the chunk states only when a backward can follow (inside forward, grad mode is always off)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    with on_device(u.device):
        return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                     bool(return_last_state), int(chunk_len), save, seq_idx, initial_state)

"""Checks of the Triton kernels against the PyTorch references, on any device.

Each check builds small random inputs, runs kernel and reference, and raises AssertionError naming the
output or gradient that is off. `tests/kernels/_interpret_worker.py` runs them on CPU in Triton's interpreter;
the test files run them on CUDA when it is present.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MARKER = "KERNEL-CHECK-RESULTS "  # prefixes the interpreter worker's JSON line
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# the interpreter runs a (BLOCK_D, BLOCK_N, BLOCK_L) scan element by element: keep the shapes tiny
SCAN_CASES = {
    "d_state16_ragged": dict(batch=2, d_inner=3, d_state=16, seqlen=19, chunk_len=8),
    "d_state12_two_groups": dict(batch=1, d_inner=6, d_state=12, seqlen=21, chunk_len=8),
    "length1": dict(batch=2, d_inner=3, d_state=12, seqlen=1, chunk_len=8),
    "no_optional_inputs": dict(batch=1, d_inner=5, d_state=4, seqlen=9, chunk_len=4, D=False, z=False,
                               delta_bias=False, softplus=False, last_state=False),
    "bf16": dict(batch=1, d_inner=4, d_state=16, seqlen=17, chunk_len=8, dtype=torch.bfloat16),
    "strided_views": dict(batch=2, d_inner=4, d_state=8, seqlen=11, chunk_len=4, strided=True),
    # packed documents: a start at a chunk edge (8), two in a row (9, 10), one right after the first step, none
    "packed_documents": dict(batch=3, d_inner=3, d_state=12, seqlen=19, chunk_len=8,
                             docs=[[8, 1, 1, 9], [1, 18], [19]]),
    # a state handed in from before the sequence (context parallelism), also with documents that cut it
    "initial_state": dict(batch=2, d_inner=3, d_state=8, seqlen=13, chunk_len=4, initial=True),
    "initial_state_packed": dict(batch=2, d_inner=3, d_state=8, seqlen=13, chunk_len=4, initial=True,
                                 docs=[[5, 8], [13]]),
}
STATE_UPDATE_CASES = {
    "d_state12": dict(batch=2, d_inner=5, d_state=12),
    "bf16_fp32_state": dict(batch=3, d_inner=8, d_state=16, dtype=torch.bfloat16),
    "strided_state_no_optional": dict(batch=2, d_inner=3, d_state=4, strided=True, optional=False),
}
CONV_CASES = {
    "silu_bias": dict(batch=2, d_inner=5, seqlen=21, width=4),
    "shorter_than_width": dict(batch=1, d_inner=3, seqlen=2, width=4, silu=False, bias=False),
    "bf16_three_tiles": dict(batch=2, d_inner=6, seqlen=37, width=3, dtype=torch.bfloat16),
    # a document shorter than the width, two starts in a row, one at a tile edge (16), none
    "packed_documents": dict(batch=3, d_inner=5, seqlen=37, width=4, docs=[[2, 1, 13, 21], [16, 21], [37]]),
}


def seq_idx_of(docs, device) -> torch.Tensor:
    """seq_idx (batch, L) int32 of rows packed from documents of these lengths."""
    rows = [torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)) for lens in docs]
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def assert_near(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.float().abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol} x scale {scale:.3g}"


def _leaves(tensors, device):
    return [t.detach().to(device).requires_grad_() if t is not None else None for t in tensors]


def check_scan(device, batch, d_inner, d_state, seqlen, chunk_len, dtype=torch.float32, D=True, z=True,
               delta_bias=True, softplus=True, last_state=True, strided=False, docs=None, initial=False) -> None:
    """Values and gradients of every input of selective_scan_triton against selective_scan_ref (with seq_idx of
    rows packed from documents of lengths `docs`)."""
    from megamoe.kernels.selective_scan import selective_scan_triton
    from megamoe.ops.selective_scan_ref import selective_scan_ref

    g = torch.Generator().manual_seed(batch * 1000 + d_inner * 100 + d_state * 10 + seqlen)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, z_in = rand(batch, d_inner, seqlen).to(dtype), rand(batch, d_inner, seqlen).to(dtype)
    delta = (0.5 * rand(batch, d_inner, seqlen)).to(dtype)
    A = -torch.exp(0.5 * rand(d_inner, d_state))  # A = -exp(A_log), as the mixer builds it
    B, C = rand(batch, d_state, seqlen).to(dtype), rand(batch, d_state, seqlen).to(dtype)
    inputs = [u, delta, A, B, C, rand(d_inner) if D else None, z_in if z else None,
              0.3 * rand(d_inner) if delta_bias else None, rand(batch, d_inner, d_state) if initial else None]
    kernel_in, ref_in = _leaves(inputs, device), _leaves(inputs, device)
    args = list(kernel_in)
    if strided:
        # u and z as the two halves of one (batch, 2 d_inner, L) projection, delta time-major: the kernel
        # must honour batch/channel strides and copy a non-unit time stride
        xz = torch.cat([args[0], args[6]], dim=1)
        args[0], args[6] = xz[:, :d_inner], xz[:, d_inner:]
        args[1] = args[1].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args[0].is_contiguous() and args[1].stride(-1) != 1
    seq = seq_idx_of(docs, device) if docs else None
    h0, h0_ref = args.pop(), ref_in[-1]
    out = selective_scan_triton(*args, softplus, last_state, chunk_len=chunk_len, seq_idx=seq, initial_state=h0)
    ref = selective_scan_ref(*ref_in[:-1], delta_softplus=softplus, return_last_state=last_state, seq_idx=seq,
                             initial_state=h0_ref)
    out, ref = (out, ref) if last_state else ((out,), (ref,))
    with torch.no_grad():  # the inference path saves no states
        inference = selective_scan_triton(*args, softplus, last_state, chunk_len=chunk_len, seq_idx=seq,
                                          initial_state=h0)
    for name, o, r in zip(("no_grad y", "no_grad last_state"), inference if last_state else (inference,), out):
        assert torch.equal(o, r.detach()), f"{name} differs from the training forward"
    assert out[0].dtype == dtype, f"y: dtype {out[0].dtype}, expected u's dtype {dtype}"
    for name, o, r in zip(("y", "last_state"), out, ref):
        assert_near(name, o, r.to(o.dtype), TOL[dtype])
    grads = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype) for o in out]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, grads)
    for name, k, r in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"), kernel_in, ref_in):
        if k is not None:
            assert_near(f"d{name}", k.grad, r.grad, TOL[dtype])


def check_state_update(device, batch, d_inner, d_state, dtype=torch.float32, strided=False, optional=True):
    """One step of selective_state_update_triton against selective_state_update_ref, y and the new state."""
    from megamoe.kernels.selective_state_update import selective_state_update_triton
    from megamoe.ops.state_update import selective_state_update_ref

    g = torch.Generator().manual_seed(batch * 100 + d_inner * 10 + d_state)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x, dt, z = (rand(batch, d_inner).to(dtype) for _ in range(3))
    A, B, C = -torch.exp(rand(d_inner, d_state)), rand(batch, d_state).to(dtype), rand(batch, d_state).to(dtype)
    D, dt_bias = (rand(d_inner), rand(d_inner)) if optional else (None, None)
    if strided:  # a state that is a slice of a larger cache
        state = rand(batch, d_inner, 2 * d_state)[:, :, :d_state]
    else:
        state = rand(batch, d_inner, d_state)
    ref_state = state.clone()
    y = selective_state_update_triton(state, x, dt, A, B, C, D, z if optional else None, dt_bias, optional)
    y_ref = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z if optional else None, dt_bias, optional)
    assert_near("y", y, y_ref, TOL[dtype])
    assert_near("state", state, ref_state, TOL[torch.float32])


def check_conv(device, batch, d_inner, seqlen, width, dtype=torch.float32, silu=True, bias=True, docs=None) -> None:
    """causal_conv1d_triton against F.conv1d (padded, cut to L) + SiLU, values and gradients; with `docs`, against
    the CPU conv of megamoe.ops with seq_idx (itself held against each document run alone in tests/ops)."""
    from megamoe.kernels.causal_conv1d import causal_conv1d_triton
    from megamoe.ops.causal_conv1d import causal_conv1d

    g = torch.Generator().manual_seed(batch * 100 + d_inner * 10 + seqlen)
    inputs = [torch.randn(batch, d_inner, seqlen, generator=g).to(dtype), torch.randn(d_inner, 1, width, generator=g),
              torch.randn(d_inner, generator=g) if bias else None]
    (x, w, b), (xr, wr, br) = _leaves(inputs, device), _leaves(inputs, device)
    seq = seq_idx_of(docs, device) if docs else None
    y = causal_conv1d_triton(x, w, b, "silu" if silu else None, seq_idx=seq)
    if seq is not None:
        y_ref = causal_conv1d(xr.float().cpu(), wr.cpu(), br.cpu() if br is not None else None,
                              "silu" if silu else None, seq.cpu()).to(device=device, dtype=dtype)
    else:
        y_ref = F.conv1d(xr.float(), wr, br, padding=width - 1, groups=d_inner)[..., :seqlen]
        y_ref = (F.silu(y_ref) if silu else y_ref).to(dtype)
    assert_near("y", y, y_ref, TOL[dtype])
    dy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy)
    for name, k, r in (("x", x, xr), ("weight", w, wr), ("bias", b, br)):
        if k is not None:
            assert_near(f"d{name}", k.grad, r.grad, TOL[dtype])


CHECKS = {"scan": (check_scan, SCAN_CASES), "state_update": (check_state_update, STATE_UPDATE_CASES),
          "conv": (check_conv, CONV_CASES)}

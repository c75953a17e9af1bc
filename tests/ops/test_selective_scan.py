"""The chunked CPU scan against the sequential reference: values and gradients of every input."""
import pytest
import torch

import megamoe.ops.scan_cpu as scan_cpu
from megamoe.ops import selective_scan, selective_scan_ref
from megamoe.ops.scan_cpu import selective_scan_cpu

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(batch, d_inner, d_state, length, seed, dtype=torch.float32, D=True, z=True, delta_bias=True):
    """Mamba-like inputs: A < 0 (as -exp(A_log)), delta around softplus(dt_bias) scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    return {
        "u": rnd(batch, d_inner, length),
        "delta": rnd(batch, d_inner, length, scale=0.5, shift=-1.0),
        "A": -torch.exp(torch.randn(d_inner, d_state, generator=g)),  # parameters stay float32, as in a model
        "B": rnd(batch, d_state, length),
        "C": rnd(batch, d_state, length),
        "D": torch.randn(d_inner, generator=g) if D else None,
        "z": rnd(batch, d_inner, length) if z else None,
        "delta_bias": torch.randn(d_inner, generator=g) * 0.5 if delta_bias else None,
    }


def _run(fn, inputs, delta_softplus, return_last_state, seed=123, **kw):
    """Outputs and the gradients of a random linear function of them, for every tensor input."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out = fn(*(leaves[k] for k in NAMES), delta_softplus=delta_softplus, return_last_state=return_last_state, **kw)
    outs = out if return_last_state else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach().float() for o in outs], {k: v.grad.float() for k, v in leaves.items() if v is not None}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


CASES = [  # batch, d_inner, d_state, L, chunk_size, D/z/delta_bias, softplus, last_state
    (2, 8, 4, 37, 8, True, True, True),     # L not a multiple of the chunk
    (1, 16, 16, 64, 16, False, False, False),  # L a multiple, no extras
    (3, 5, 3, 20, 7, True, False, True),
    (2, 6, 2, 1, None, True, True, True),     # L = 1
    (2, 4, 5, 9, 1, False, True, True),       # one step per chunk
    (2, 12, 8, 50, None, True, True, False),  # default chunk (whole sequence in one chunk)
]


@pytest.mark.parametrize("batch,d_inner,d_state,length,chunk,extras,softplus,last", CASES)
def test_matches_reference_fp32(batch, d_inner, d_state, length, chunk, extras, softplus, last):
    inputs = _inputs(batch, d_inner, d_state, length, seed=length, D=extras, z=extras, delta_bias=extras)
    if not softplus:  # delta must stay positive without softplus, as the caller guarantees in a model
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
    ref_out, ref_grad = _run(selective_scan_ref, inputs, softplus, last)
    out, grad = _run(selective_scan_cpu, inputs, softplus, last, chunk_size=chunk)
    for name, a, b in zip(("y", "last_state"), out, ref_out):
        assert a.shape == b.shape and _rel(a, b) < 1e-5, (name, _rel(a, b))
    assert grad.keys() == ref_grad.keys()
    for name in grad:
        assert grad[name].shape == ref_grad[name].shape
        assert _rel(grad[name], ref_grad[name]) < 1e-5, (name, _rel(grad[name], ref_grad[name]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    inputs = _inputs(2, 8, 4, 29, seed=5, dtype=dtype)
    ref_out, ref_grad = _run(selective_scan_ref, inputs, True, True)
    y = selective_scan_cpu(*(inputs[k] for k in NAMES), delta_softplus=True)
    assert y.dtype == dtype
    out, grad = _run(selective_scan_cpu, inputs, True, True, chunk_size=8)
    assert out[1].dtype == torch.float32  # the last state stays float32, as in mamba_ssm
    for a, b in zip(out, ref_out):
        assert _rel(a, b) < 2e-2
    for name in grad:
        assert _rel(grad[name], ref_grad[name]) < 3e-2, name


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 3, 2, 5
    args = [torch.randn(b, d, L, generator=g, dtype=torch.float64),
            torch.randn(b, d, L, generator=g, dtype=torch.float64) * 0.5,
            -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.5,
            torch.randn(b, n, L, generator=g, dtype=torch.float64),
            torch.randn(b, n, L, generator=g, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64),
            torch.randn(b, d, L, generator=g, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]

    def fn(*xs):
        return selective_scan_cpu(*xs, delta_softplus=True, return_last_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_no_grad_and_partial_grads():
    inputs = _inputs(2, 8, 4, 21, seed=3)
    args = [inputs[k] for k in NAMES]
    with torch.no_grad():
        y = selective_scan_cpu(*args, delta_softplus=True, chunk_size=4)
    assert torch.allclose(y, selective_scan_ref(*args, delta_softplus=True), rtol=1e-5, atol=1e-5)
    # only B needs a gradient: the others are skipped, B's matches the reference
    grads = []
    for fn in (selective_scan_ref, selective_scan_cpu):
        B = inputs["B"].clone().requires_grad_()
        fn(args[0], args[1], args[2], B, *args[4:], delta_softplus=True).pow(2).sum().backward()
        grads.append(B.grad)
    assert _rel(grads[1], grads[0]) < 1e-5


def test_non_contiguous_inputs_and_gradient():
    """(batch, L, d_inner)-major tensors passed as transposed views, as a model's projections produce them; the
    loss goes through y.transpose(1, 2) @ W, as out_proj does, so dy arrives non-contiguous too."""
    inputs = _inputs(2, 8, 4, 19, seed=9)
    W = torch.randn(8, 3, generator=torch.Generator().manual_seed(4))
    results = []
    for fn, transposed in ((selective_scan_ref, False), (selective_scan_cpu, True)):
        x = {k: v.clone() for k, v in inputs.items()}
        if transposed:
            x["u"], x["delta"] = (x[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("u", "delta"))
        x = {k: v.requires_grad_() for k, v in x.items()}
        y = fn(*(x[k] for k in NAMES), delta_softplus=True)
        (y.transpose(1, 2) @ W).pow(2).sum().backward()
        results.append((y.detach(), {k: v.grad for k, v in x.items()}))
    (y_ref, g_ref), (y, g) = results
    assert _rel(y, y_ref) < 1e-5
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < 1e-5, name


def test_dispatcher_uses_cpu_scan(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(len(args))
        return selective_scan_cpu(*args, **kwargs)

    monkeypatch.setattr(scan_cpu, "selective_scan_cpu", spy)
    inputs = _inputs(1, 4, 2, 6, seed=1)
    y = selective_scan(*(inputs[k] for k in NAMES), delta_softplus=True)
    assert calls == [10]
    assert torch.allclose(y, selective_scan_ref(*(inputs[k] for k in NAMES), delta_softplus=True), atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    ({"A": torch.zeros(5, 4)}, "A must be"),
    ({"B": torch.zeros(2, 3, 7)}, "B must have shape"),
    ({"delta": torch.zeros(2, 8, 6)}, "delta must have shape"),
    ({"D": torch.zeros(3)}, "D must have shape"),
])
def test_bad_shapes_name_the_argument(bad, match):
    inputs = dict(_inputs(2, 8, 4, 7, seed=2), **bad)
    with pytest.raises(ValueError, match=match):
        selective_scan_cpu(*(inputs[k] for k in NAMES))

"""Packed documents: a row [doc A | doc B | doc C] with seq_idx gives, in fp32, the outputs and every input gradient
of running A, B and C separately, against float64 references; boundaries at a chunk edge, two in a row, right
after the first step, none, and a row whose index starts above 0. Bad seq_idx is a clear error."""
import pytest
import torch

from megamoe.data.packing import document_index, document_positions
from megamoe.ops import causal_conv1d, selective_scan, selective_scan_ref
from megamoe.ops.scan_cpu import selective_scan_cpu
from tests.kernels._checks import seq_idx_of

DOCS = [[8, 1, 1, 9], [1, 18], [19]]  # chunk size 8: a start at the chunk edge, two in a row, at 1, none
L = 19


def _rnd(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _scan_inputs(batch=3, d_inner=5, d_state=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_rnd(g, batch, d_inner, L), _rnd(g, batch, d_inner, L, scale=0.5, shift=-1.0),
            -torch.exp(_rnd(g, d_inner, d_state)), _rnd(g, batch, d_state, L), _rnd(g, batch, d_state, L),
            _rnd(g, d_inner), _rnd(g, batch, d_inner, L), _rnd(g, d_inner, scale=0.5)]


def _each_document(fn, inputs, per_row=(0, 1, 3, 4, 6)):
    """fn on every document alone (the inputs of `per_row` sliced to it): (y as a packed row, last states)."""
    y, last = torch.zeros_like(inputs[0]), []
    for r, lengths in enumerate(DOCS):
        start = 0
        for n in lengths:
            part = [t[r:r + 1, ..., start:start + n] if i in per_row else t for i, t in enumerate(inputs)]
            out, state = fn(*part)
            y[r:r + 1, :, start:start + n] = out
            start += n
        last.append(state)
    return y, torch.cat(last)


def _grads(outputs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_scan_of_a_packed_row_is_the_scan_of_each_document(impl):
    base = _scan_inputs()
    seq = seq_idx_of(DOCS, "cpu")
    seq[1] += 3  # an index need not start at 0
    ref_leaves = [t.clone().requires_grad_() for t in base]
    y_ref, last_ref = _each_document(lambda *a: selective_scan_ref(*a, True, True), ref_leaves)
    want = (y_ref, last_ref) + _grads((y_ref, last_ref), ref_leaves)
    leaves = [t.float().clone().requires_grad_() for t in base]
    if impl == "cpu":
        y, last = selective_scan_cpu(*leaves, True, True, seq_idx=seq, chunk_size=8)
    else:
        y, last = selective_scan_ref(*leaves, True, True, seq_idx=seq)
    got = (y, last) + _grads((y, last), leaves)
    for name, a, b in zip(["y", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"],
                          got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_conv_of_a_packed_row_is_the_conv_of_each_document():
    g = torch.Generator().manual_seed(0)
    x, w, b = _rnd(g, 3, 6, L), _rnd(g, 6, 1, 4), _rnd(g, 6)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y_ref, _ = _each_document(lambda xi, wi, bi: (causal_conv1d(xi, wi, bi, "silu"), xi[:, 0, 0]), ref_leaves,
                              per_row=(0,))
    want = (y_ref,) + _grads((y_ref,), ref_leaves)
    leaves = [t.float().clone().requires_grad_() for t in (x, w, b)]
    y = causal_conv1d(*leaves, "silu", seq_idx=seq_idx_of(DOCS, "cpu"))
    got = (y,) + _grads((y,), leaves)
    for name, a, c in zip(["y", "dx", "dweight", "dbias"], got, want):
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # only some inputs trained (a frozen conv, or a frozen input): each gradient asked for is still right
    for trained in ((0,), (1, 2)):
        part = [t.float().clone().requires_grad_(i in trained) for i, t in enumerate((x, w, b))]
        y = causal_conv1d(*part, "silu", seq_idx=seq_idx_of(DOCS, "cpu"))
        grads = _grads((y,), [part[i] for i in trained])
        for i, g_i in zip(trained, grads):
            torch.testing.assert_close(g_i.double(), want[1 + i], rtol=1e-4, atol=1e-5)


def test_without_boundaries_seq_idx_changes_nothing():
    inputs = [t.float() for t in _scan_inputs()]
    zeros = torch.zeros(3, L, dtype=torch.int32)
    assert torch.equal(selective_scan(*inputs, True, seq_idx=zeros), selective_scan(*inputs, True))
    x, w = inputs[0], torch.randn(5, 4)
    assert torch.equal(causal_conv1d(x, w, seq_idx=zeros), causal_conv1d(x, w))


def test_document_index_counts_eod_tokens_before_each_position():
    tokens = torch.tensor([[5, 3, 7, 7, 3, 3, 9], [3, 4, 4, 4, 4, 4, 4]])
    assert document_index(tokens, eod=3).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert document_index(tokens, eod=3).dtype == torch.int32
    assert document_positions(document_index(tokens, eod=3)).tolist() == [[0, 1, 0, 1, 2, 0, 0],
                                                                          [0, 0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("seq_idx, message", [
    (torch.zeros(3, L, dtype=torch.int64), "seq_idx must be an int32 tensor"),
    (torch.zeros(3, L - 1, dtype=torch.int32), r"seq_idx must have shape \(batch, L\) = \(3, 19\)"),
    (torch.tensor([[0] * 10 + [1] * 5 + [0] * 4] * 3, dtype=torch.int32), "seq_idx decreases within a row"),
])
def test_bad_seq_idx_is_a_clear_error(seq_idx, message):
    inputs = [t.float() for t in _scan_inputs()]
    with pytest.raises(ValueError, match=message):
        selective_scan(*inputs, True, seq_idx=seq_idx)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(inputs[0], torch.randn(5, 4), seq_idx=seq_idx)

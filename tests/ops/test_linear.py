"""The decode products (megamoe.ops.linear) equal torch's: oneDNN's linear and the row-blocked (in, out) product
on CPU inference, F.linear and x @ W under autograd."""
import pytest
import torch
import torch.nn.functional as F

from megamoe.ops import linear as ops_linear


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # matmul_in_out blocks the rows by threads
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_products_equal_torchs(two_threads, dtype, tol, rows):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 512, generator=gen).to(dtype)
    weight = (torch.randn(1024, 512, generator=gen) / 512 ** 0.5).to(dtype)  # above oneDNN's size threshold
    bias = torch.randn(1024, generator=gen).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ops_linear.linear(x, weight, bias), F.linear(x, weight, bias), rtol=tol, atol=tol)
        torch.testing.assert_close(ops_linear.linear(x[:, None], weight), F.linear(x[:, None], weight), rtol=tol,
                                   atol=tol)
        w_in_out = weight.t().contiguous()
        torch.testing.assert_close(ops_linear.matmul_in_out(x, w_in_out), x @ w_in_out, rtol=tol, atol=tol)
        torch.testing.assert_close(ops_linear.linear(x, w_in_out.t()), x @ w_in_out, rtol=tol, atol=tol)
        stored = ops_linear.store_out_in(w_in_out)  # the same values, stored (out, in)
        assert torch.equal(stored, w_in_out) and stored.t().is_contiguous()
        torch.testing.assert_close(ops_linear.matmul_in_out(x, stored), x @ w_in_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("out_features,threads", [(1024, 2), (1024, 3), (300, 2), (64, 2), (1024, 1)])
def test_one_token_products_equal_torchs(out_features, threads):
    """One token (the row-blocked path where the rows split evenly over the threads; else oneDNN or F.linear),
    as (1, in), (1, 1, in) and a strided row, with and without a bias."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(1)
        weight = torch.randn(out_features, 512, generator=gen) / 512 ** 0.5
        bias = torch.randn(out_features, generator=gen)
        x = torch.randn(3, 512, generator=gen)
        with torch.no_grad():
            for row in (x[:1], x[None, 1:2], x[2:, ::1], torch.randn(512, 2, generator=gen).t()[:1]):
                for b in (None, bias):
                    torch.testing.assert_close(ops_linear.linear(row, weight, b), F.linear(row, weight, b),
                                               rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_autograd_takes_torchs_path():
    x = torch.randn(2, 512, requires_grad=True)
    weight = torch.randn(1024, 512, requires_grad=True)
    ops_linear.linear(x, weight).sum().backward()
    ops_linear.matmul_in_out(x, weight.t()).sum().backward()
    assert x.grad is not None and weight.grad is not None


def test_module_linear_calls_other_modules_as_they_are():
    class Doubler(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    class Stepper(torch.nn.Module):
        def step(self, x):
            return 3 * x

    x = torch.ones(1, 4)
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        assert torch.allclose(ops_linear.module_linear(lin, x), lin(x))
    assert torch.equal(ops_linear.module_linear(Doubler(), x), 2 * x)
    assert torch.equal(ops_linear.module_linear(Stepper(), x), 3 * x)

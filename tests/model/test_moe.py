"""Switch MoE on hand-checked cases: routing, capacity and dropping, load-balancing and z losses, top-k."""
import copy
import math

import pytest
import torch

from megamoe.model.moe import Experts, SwitchMoE, aux_loss_scale, capacity, load_balancing_loss
from megamoe.model.router import Routing

# 8 tokens that are one-hot in 4 dims; the router is 10 x identity, so token t goes to expert ROUTE[t].
ROUTE = [0, 0, 0, 1, 1, 2, 3, 3]


def _moe(capacity_factor=1.0, top_k=1, lb=0.01, z=0.0, activation="relu"):
    torch.manual_seed(0)
    moe = SwitchMoE(4, num_experts=4, d_expert=6, top_k=top_k, capacity_factor=capacity_factor,
                    load_balancing_weight=lb, z_loss_weight=z, activation=activation)
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(4))
    x = torch.eye(4)[ROUTE].reshape(2, 4, 4)  # (batch 2, L 4, d 4)
    return moe, x


def _expected(moe, x, kept):
    probs = torch.softmax(moe.router(x.reshape(8, 4)), -1)
    rows = []
    for t, e in enumerate(ROUTE):
        xt = x.reshape(8, 4)[t]
        rows.append(probs[t, e] * moe.experts.expert(e, xt[None])[0] if t in kept else torch.zeros(4))
    return torch.stack(rows).reshape(2, 4, 4), probs


def test_capacity_formula():
    assert capacity(8, 4, 1, 1.0) == 2
    assert capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert capacity(8, 4, 2, 1.25) == 5
    assert capacity(8, 4, 1, 0) == 8  # no limit


def test_tokens_over_capacity_are_dropped_in_token_order():
    moe, x = _moe(capacity_factor=1.0)  # capacity 2: expert 0 gets tokens 0, 1, 2 and drops token 2
    out = moe(x)
    expected, probs = _expected(moe, x, kept={0, 1, 3, 4, 5, 6, 7})
    torch.testing.assert_close(out, expected)
    assert torch.all(out.reshape(8, 4)[2] == 0)
    assert moe.last_stats.tokens_per_expert.tolist() == [3, 2, 1, 2]
    assert (moe.last_stats.dropped, moe.last_stats.assignments) == (1, 8)
    f = torch.tensor([3, 2, 1, 2]) / 8
    torch.testing.assert_close(moe.last_aux_loss, 0.01 * 4 * (f * probs.mean(0)).sum())


def test_no_capacity_limit_keeps_every_token():
    moe, x = _moe(capacity_factor=0)
    expected, _ = _expected(moe, x, kept=set(range(8)))
    torch.testing.assert_close(moe(x), expected)
    assert moe.last_stats.dropped == 0


def test_load_balancing_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])[:, None]
    assert load_balancing_loss(probs, index, 4).item() == pytest.approx(1.0)
    skewed = torch.zeros(8, dtype=torch.long)[:, None]
    assert load_balancing_loss(torch.eye(4)[[0] * 8], skewed, 4).item() == pytest.approx(4.0)


def test_aux_and_z_loss_gradients_reach_the_router():
    moe, x = _moe(capacity_factor=0, lb=0.5, z=0.1)
    moe(x).sum().backward()  # outside aux_loss_scale, the aux losses get gradient 1
    with_aux = moe.router.weight.grad.clone()

    moe.router.weight.grad = None
    moe.load_balancing_weight, moe.z_loss_weight = 0.0, 0.0
    moe(x).sum().backward()
    without = moe.router.weight.grad.clone()

    moe.router.weight.grad = None
    logits = moe.router(x.reshape(8, 4))
    probs = torch.softmax(logits, -1)
    aux = 0.5 * load_balancing_loss(probs, probs.argmax(-1, keepdim=True), 4)
    zl = 0.1 * torch.logsumexp(logits, -1).pow(2).mean()
    (aux + zl).backward()
    torch.testing.assert_close(with_aux, without + moe.router.weight.grad)
    assert moe.last_z_loss is None  # z weight is 0 in the last call


def test_aux_loss_scale_follows_micro_batches():
    moe, x = _moe(capacity_factor=0, lb=1.0)
    moe(x).sum().backward()
    g1 = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    moe.load_balancing_weight = 0.0
    moe(x).sum().backward()
    g0 = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    moe.load_balancing_weight = 1.0
    with aux_loss_scale(0.25):
        moe(x).sum().backward()
    torch.testing.assert_close(moe.router.weight.grad, g0 + 0.25 * (g1 - g0))


def test_top2_combines_two_experts_and_counts_capacity_over_choices():
    moe, x = _moe(capacity_factor=0, top_k=2)
    out = moe(x).reshape(8, 4)
    xf = x.reshape(8, 4)
    probs = torch.softmax(moe.router(xf), -1)
    top = probs.topk(2, -1)
    for t in range(8):
        want = sum(top.values[t, k] * moe.experts.expert(int(top.indices[t, k]), xf[t][None])[0] for k in range(2))
        torch.testing.assert_close(out[t], want)
    assert moe.last_stats.assignments == 16


def test_swiglu_and_linear_experts():
    moe, x = _moe(capacity_factor=0, activation="swiglu")
    assert moe.experts.w1.shape == (4, 4, 12) and moe.experts.w2.shape == (4, 6, 4)
    expected, _ = _expected(moe, x, kept=set(range(8)))
    torch.testing.assert_close(moe(x), expected)
    linear = SwitchMoE(4, num_experts=2, d_expert=1, activation="linear", d_out=8, capacity_factor=0)
    assert linear(torch.randn(3, 4)).shape == (3, 8) and not hasattr(linear.experts, "w2")


def test_bf16_autocast_keeps_router_in_float32():
    moe, x = _moe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
        assert moe.router(x).dtype == torch.float32
    assert out.dtype == torch.bfloat16 and math.isfinite(out.float().sum().item())


needs_grouped_mm = pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                                      reason="torch.nn.functional.grouped_mm needs torch >= 2.9")


def _experts_pair(activation, d_in=16, d_hidden=32, d_out=16, num_experts=4):
    """The same experts twice: one through the grouped GEMM, one through the per-expert loop."""
    torch.manual_seed(0)
    grouped = Experts(num_experts, d_in, d_hidden, d_out, activation)
    loop = copy.deepcopy(grouped)
    loop.grouped_gemm = False
    return grouped, loop


@needs_grouped_mm
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "linear"])
def test_grouped_gemm_equals_the_expert_loop(activation):
    grouped, loop = _experts_pair(activation, d_out=32 if activation == "linear" else 16)
    assert grouped.grouped_fits(torch.device("cpu"), torch.float32, 16)
    counts = [5, 0, 9, 2]  # expert 1 receives no token
    x = torch.randn(sum(counts), 16)
    grad = torch.randn(sum(counts), grouped.output_size)
    outs = {}
    for name, experts in (("grouped", grouped), ("loop", loop)):
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        y.backward(grad)
        outs[name] = [y, xi.grad] + [p.grad for p in experts.parameters()]
    for got, want in zip(outs["grouped"], outs["loop"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # And each token went through its own expert.
    want_y = torch.cat([grouped.expert(e, chunk) for e, chunk in enumerate(x.split(counts)) if len(chunk)])
    torch.testing.assert_close(outs["grouped"][0], want_y, rtol=1e-5, atol=1e-6)
    assert outs["grouped"][-1][1].abs().sum() == 0  # the idle expert gets a zero gradient


@needs_grouped_mm
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_grouped_gemm_under_bf16_autocast(device):
    """On CUDA this is the CUTLASS grouped GEMM that training uses."""
    grouped, loop = (e.to(device) for e in _experts_pair("gelu", d_in=64, d_hidden=128, d_out=64))
    assert grouped.grouped_fits(torch.device(device), torch.bfloat16, 64)
    counts = [70, 30, 0, 60]
    x = torch.randn(sum(counts), 64, device=device)
    grad = torch.randn(sum(counts), 64, device=device)
    outs = []
    for experts in (grouped, loop):
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = experts(xi, counts)
        y.float().mul(grad).sum().backward()
        outs.append([y.float(), xi.grad] + [p.grad for p in experts.parameters()])
        assert y.dtype == torch.bfloat16
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@needs_grouped_mm
def test_grouped_gemm_is_never_given_an_empty_group(monkeypatch):
    """Idle experts stay out of grouped_mm, whose backward on Blackwell writes garbage weight gradients for
    empty groups (pytorch#172439); their gradient is exactly zero whatever the kernel does."""
    grouped, loop = _experts_pair("gelu")
    real = torch.nn.functional.grouped_mm

    def strict_grouped_mm(a, b, offs):
        assert (offs.diff(prepend=offs.new_zeros(1)) > 0).all(), f"empty group in offs {offs.tolist()}"
        return real(a, b, offs=offs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", strict_grouped_mm)
    counts = [0, 4, 0, 3]
    x = torch.randn(sum(counts), 16)
    y = grouped(x, counts)
    y.sum().backward()
    loop(x, counts).sum().backward()
    torch.testing.assert_close(y, loop(x, counts))
    for got, want in zip(grouped.parameters(), loop.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
        assert got.grad[[0, 2]].abs().sum() == 0


@needs_grouped_mm
def test_unaligned_widths_fall_back_to_the_loop(monkeypatch):
    grouped, loop = _experts_pair("gelu", d_in=6, d_hidden=10, d_out=6)  # 24-byte fp32 rows: not 16-aligned
    assert not grouped.grouped_fits(torch.device("cpu"), torch.float32, 6)
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", None)  # would fail if it were called
    x = torch.randn(9, 6)
    torch.testing.assert_close(grouped(x, [2, 3, 4, 0]), loop(x, [2, 3, 4, 0]))


@pytest.mark.parametrize("options", [
    dict(top_k=1),
    dict(top_k=2, routing=Routing(score_function="sigmoid"), expert_bias=True, shared_expert_size=64),
    dict(top_k=2, routing=Routing(pre_softmax=False), activation="swiglu"),
    dict(top_k=1, activation="linear", d_out=96),
], ids=["switch", "sigmoid_top2_bias_shared", "pre_softmax_top2_swiglu", "linear_projection"])
def test_decode_step_equals_forward(options):
    """SwitchMoE.step (a decode step: each token straight through its experts' weights) is forward() without a
    capacity limit, for every routing option it takes; at 2 threads and widths where the fast products run."""
    torch.manual_seed(0)
    moe = SwitchMoE(256, num_experts=4, d_expert=512, capacity_factor=0, **options).eval()
    if moe.router.expert_bias is not None:
        moe.router.expert_bias.copy_(torch.randn(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (1, 8):
            x = torch.randn(rows, 1, 256)
            with torch.no_grad():
                torch.testing.assert_close(moe.step(x), moe(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_decode_step_drops_no_token_whatever_the_capacity():
    """A step of a model trained with a capacity limit is forward() without one (it drops no token), on its
    own path (a few tokens) and on forward()'s (more than 16, or under autograd); the configured factor stays."""
    torch.manual_seed(0)
    moe = SwitchMoE(32, num_experts=4, d_expert=64, capacity_factor=0.5).eval()
    uncapped = SwitchMoE(32, num_experts=4, d_expert=64, capacity_factor=0).eval()
    uncapped.load_state_dict(moe.state_dict())
    for rows, grad in ((1, False), (8, False), (24, False), (8, True)):
        x = torch.randn(rows, 1, 32)
        with torch.set_grad_enabled(grad):
            out = moe.step(x)
            torch.testing.assert_close(out, uncapped(x), rtol=1e-5, atol=1e-5)
            if rows == 24:  # a capacity of 0.5 drops tokens here: the limit would change the result
                assert not torch.allclose(out, moe(x), atol=1e-3)
        assert moe.capacity_factor == 0.5

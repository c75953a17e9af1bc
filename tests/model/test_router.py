"""MoE routing options on hand-checked cases: score functions, top-k before or after the softmax, the expert bias
and its update, dropping by probability, expert choice, forced balancing, per-sequence and global-batch losses,
the shared expert and the dense fallback of MoE projections."""
import pytest
import torch

from megamoe.model.moe import SwitchMoE
from megamoe.model.router import Routing, load_balancing_loss, token_choice

# 8 tokens that are one-hot in 4 dims; the router is 10 x identity, so token t prefers expert ROUTE[t].
ROUTE = [0, 0, 0, 1, 1, 2, 3, 3]


def _moe(top_k=1, capacity_factor=0.0, lb=0.01, **kw):
    torch.manual_seed(0)
    moe = SwitchMoE(4, num_experts=4, d_expert=6, top_k=top_k, capacity_factor=capacity_factor,
                    load_balancing_weight=lb, activation="relu", **kw)
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(4))
    return moe, torch.eye(4)[ROUTE].reshape(2, 4, 4)


def test_sigmoid_top2_renormalises_as_megatron_and_softmax_after_topk():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gates = torch.sigmoid(logits)
    index, weights = token_choice(logits, gates, 2, Routing(score_function="sigmoid"))
    assert index.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, gates[:, :2] / gates[:, :2].sum())  # Megatron's rule: sums to 1
    _, raw = token_choice(logits, gates, 2, Routing(score_function="sigmoid", renormalize=False))
    torch.testing.assert_close(raw, gates[:, :2])
    _, post = token_choice(logits, torch.softmax(logits, -1), 2, Routing(pre_softmax=False))
    torch.testing.assert_close(post, torch.softmax(logits[:, :2], -1))  # softmax over the chosen two
    _, pre = token_choice(logits, torch.softmax(logits, -1), 2, Routing())
    torch.testing.assert_close(pre, torch.softmax(logits, -1)[:, :2])  # Switch's: not renormalised


def test_expert_bias_changes_the_choice_not_the_weights():
    moe, x = _moe(expert_bias=True)
    assert "router.expert_bias" in moe.state_dict() and "router.expert_bias" not in dict(moe.named_parameters())
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # expert 3 wins every token
    out = moe(x).reshape(8, 4)
    assert moe.last_stats.tokens_per_expert.tolist() == [0, 0, 0, 8]
    xf = x.reshape(8, 4)
    gates = torch.softmax(moe.router(xf), -1)
    want = gates[:, 3:4] * moe.experts.expert(3, xf)  # weighted by the unbiased gate
    torch.testing.assert_close(out, want)


def test_an_overloaded_experts_bias_moves_down_by_the_update_rate():
    moe, _ = _moe(expert_bias=True)
    moe.router.update_expert_bias(torch.tensor([10.0, 2.0, 2.0, 2.0]), 0.01)
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    moe.router.update_expert_bias(torch.tensor([4.0, 4.0, 4.0, 4.0]), 0.01)  # balanced: nothing moves
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_drop_policy_probs_keeps_each_experts_highest_weighted_tokens():
    # capacity 2 (8 tokens, 4 experts, factor 1); expert 0 gets tokens 0, 1, 2, of which token 0 is the weakest
    moe_pos, x = _moe(capacity_factor=1.0)
    moe_probs, _ = _moe(capacity_factor=1.0, routing=Routing(drop_policy="probs"))
    x = x.clone()
    x[0, 0, 0] = 0.5
    out_pos, out_probs = moe_pos(x).reshape(8, 4), moe_probs(x).reshape(8, 4)
    assert torch.all(out_pos[2] == 0) and out_pos[0].abs().sum() > 0  # position: the third one dropped
    assert torch.all(out_probs[0] == 0) and out_probs[2].abs().sum() > 0  # probs: the weakest dropped
    assert moe_probs.last_stats.dropped == 1


def test_expert_choice_takes_each_experts_top_tokens_and_evaluates_by_token_choice():
    moe, x = _moe(capacity_factor=1.0, lb=0.0, routing=Routing(router_type="expert_choice",
                                                             load_balancing_type="none"))
    out = moe(x).reshape(8, 4)  # capacity 2 each, whichever expert a token prefers
    assert moe.last_stats.tokens_per_expert.tolist() == [2, 2, 2, 2]
    assert moe.last_aux_loss is None
    xf = x.reshape(8, 4)
    gates = torch.softmax(moe.router(xf), -1)
    top = gates.t().topk(2, dim=1)
    want = torch.zeros(8, 4)
    for e in range(4):
        for g, t in zip(top.values[e], top.indices[e]):
            want[t] += g * moe.experts.expert(e, xf[t][None])[0]
    torch.testing.assert_close(out, want)
    assert moe.last_stats.dropped == 8 - len(set(top.indices.flatten().tolist()))  # tokens no expert took
    moe.eval()  # not causal: evaluation and generation route by token choice
    moe(x)
    assert moe.last_stats.tokens_per_expert.tolist() == [3, 2, 1, 2]


def test_force_load_balancing_deals_tokens_evenly_whatever_the_router():
    moe, x = _moe(top_k=2, routing=Routing(force_load_balancing=True))
    moe(x)
    assert moe.last_stats.tokens_per_expert.tolist() == [4, 4, 4, 4]


def test_sequence_loss_is_the_mean_of_each_sequences_loss():
    seq, x = _moe(lb=1.0, routing=Routing(load_balancing_type="seq_aux_loss"))
    per_sequence = []
    for b in range(2):
        seq(x[b:b + 1])
        per_sequence.append(seq.last_aux_loss)
    seq(x)
    torch.testing.assert_close(seq.last_aux_loss, sum(per_sequence) / 2)
    micro, _ = _moe(lb=1.0)
    micro(x)
    assert not torch.allclose(micro.last_aux_loss, seq.last_aux_loss)  # the two differ on this batch


def test_global_loss_reads_the_counts_it_is_handed():
    moe, x = _moe(lb=1.0, routing=Routing(load_balancing_type="global_aux_loss"))
    moe(x)
    own = moe.last_aux_loss  # without global counts: the micro-batch's own, as aux_loss
    probs = torch.softmax(moe.router(x.reshape(8, 4)), -1)
    torch.testing.assert_close(own, load_balancing_loss(probs, probs.argmax(-1, keepdim=True), 4))
    moe.global_counts = torch.tensor([1.0, 1.0, 1.0, 5.0])
    moe(x)
    torch.testing.assert_close(moe.last_aux_loss, 4 * (torch.tensor([1, 1, 1, 5]) / 8 * probs.mean(0)).sum())


def test_shared_expert_adds_a_dense_ffn_of_every_token():
    moe, x = _moe(shared_expert_size=5)
    routed, _ = _moe()
    out = moe(x)
    torch.testing.assert_close(out, routed(x) + moe.shared(x))
    out.sum().backward()
    assert moe.shared.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fallback", [False, True])
def test_a_dropped_token_of_an_moe_projection_gets_zero_or_the_dense_fallback(fallback):
    torch.manual_seed(0)
    moe = SwitchMoE(4, num_experts=4, d_expert=1, capacity_factor=1.0, activation="linear", d_out=6,
                    dense_fallback=fallback)
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(4))
    x = torch.eye(4)[ROUTE]
    out = moe(x)  # token 2 is over expert 0's capacity
    xf = x.float()
    if fallback:
        torch.testing.assert_close(out[2], moe.fallback(xf[2]))
        out.sum().backward()
        assert moe.fallback.weight.grad.abs().sum() > 0
    else:
        assert torch.all(out[2] == 0)
    assert all(out[t].abs().sum() > 0 for t in (0, 1, 3))

"""Context parallelism's sequence ops, each against the op on the whole sequence, on 4 gloo ranks (3 hops of the
carried state), float64 where the ops compute in it:

- the chain of (decay, state) over the ranks against the sequential recurrence, forward and backward;
- the conv with its halo, the two-pass scan and attention, outputs and every input's gradient, with packed
  documents: one starts exactly at a slice's first token, one spans three slices;
- and a whole training step on a 4096-token row of packed documents (tiny width), CP2 against one process.
"""
import pytest
import torch
import torch.distributed as dist

from megamoe.config import config_from_dict
from megamoe.data.packing import add_document_fields
from megamoe.model.attention import attend
from megamoe.ops import causal_conv1d, selective_scan_ref
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.context_parallel import (
    carried_gradients,
    cp_attend,
    cp_causal_conv1d,
    cp_selective_scan,
    entering_states,
)
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import make_runner, train_step
from megamoe.training.optimizer import build_optimizer

RANKS, BATCH, D_INNER, D_STATE, L = 4, 2, 3, 4, 32
SLICE = L // RANKS


def _seq_idx():
    """Row 0: documents [0, 8) [8, 13) [13, 32): the second starts at slice 1's first token, the third spans
    slices 1-3. Row 1: one document."""
    seq = torch.zeros(BATCH, L, dtype=torch.int32)
    seq[0, 8:], seq[0, 13:] = 1, 2
    return seq


def _local(t, rank, dim=-1):
    return t.narrow(dim, rank * SLICE, SLICE)


def _prefix_combine(rank):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(RANKS, BATCH, D_INNER, D_STATE, generator=gen, dtype=torch.float64).requires_grad_()
    h = torch.randn(RANKS, BATCH, D_INNER, D_STATE, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(RANKS, BATCH, D_INNER, D_STATE, generator=gen, dtype=torch.float64)
    states, state = [], torch.zeros_like(h[0])  # sequential: H_r = a_{r-1} H_{r-1} + h_{r-1}
    for r in range(RANKS):
        states.append(state)
        state = a[r] * state + h[r]
    sum((s * g[r]).sum() for r, s in enumerate(states)).backward()

    state = entering_states(a[rank].detach(), h[rank].detach(), dist.group.WORLD)
    carried = carried_gradients(g[rank], a[rank].detach(), dist.group.WORLD)  # G_{r+1}: dh_r, and da_r = H_r G
    return dict(state=(state, states[rank].detach()), da=(state * carried, a.grad[rank]), dh=(carried, h.grad[rank]))


def _grads_against_whole(fn_whole, fn_slice, inputs: dict, sliced: dict, rank) -> dict:
    """fn on the whole inputs vs this rank's fn on its slices: its output slice and each input's gradient
    (sliced inputs: this rank's slice of the whole gradient; shared ones: summed over the ranks)."""
    whole = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn_whole(**whole)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * upstream).sum().backward()
    mine = {k: (_local(v, rank, sliced[k]) if k in sliced else v).detach().clone()
            .requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    local = fn_slice(**mine)
    (local * _local(upstream, rank, sliced["out"])).sum().backward()
    pairs = {"out": (local.detach(), _local(out.detach(), rank, sliced["out"]))}
    for k, v in mine.items():
        if not v.is_floating_point():
            continue
        grad = v.grad.clone()
        if k not in sliced:
            dist.all_reduce(grad)
        pairs[k] = (grad, _local(whole[k].grad, rank, sliced[k]) if k in sliced else whole[k].grad)
    return pairs


def _ops(rank):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(2)
    f64 = dict(generator=gen, dtype=torch.float64)
    seq = _seq_idx()
    scan_in = dict(u=torch.randn(BATCH, D_INNER, L, **f64), delta=torch.randn(BATCH, D_INNER, L, **f64),
                   A=-torch.rand(D_INNER, D_STATE, **f64) - 0.5, B=torch.randn(BATCH, D_STATE, L, **f64),
                   C=torch.randn(BATCH, D_STATE, L, **f64), D=torch.randn(D_INNER, **f64),
                   z=torch.randn(BATCH, D_INNER, L, **f64), delta_bias=torch.randn(D_INNER, **f64), seq_idx=seq)
    scan_sliced = dict(u=-1, delta=-1, B=-1, C=-1, z=-1, seq_idx=-1, out=-1)
    conv_in = dict(x=torch.randn(BATCH, D_INNER, L, **f64), weight=torch.randn(D_INNER, 4, **f64),
                   bias=torch.randn(D_INNER, **f64), seq_idx=seq)
    attn_in = dict(q=torch.randn(BATCH, 2, L, 5, **f64), k=torch.randn(BATCH, 2, L, 5, **f64),
                   v=torch.randn(BATCH, 2, L, 5, **f64), seq_idx=seq)
    attn_sliced = dict(q=2, k=2, v=2, seq_idx=1, out=2)
    return dict(
        scan=_grads_against_whole(
            lambda **t: selective_scan_ref(**t, delta_softplus=True),
            lambda **t: cp_selective_scan(**t, delta_softplus=True, group=group), scan_in, scan_sliced, rank),
        conv=_grads_against_whole(
            lambda **t: causal_conv1d(**t, activation="silu"),
            lambda **t: cp_causal_conv1d(**t, activation="silu", group=group), conv_in,
            dict(x=-1, seq_idx=-1, out=-1), rank),
        attention=_grads_against_whole(attend, lambda **t: cp_attend(**t, group=group), attn_in, attn_sliced, rank))


def _on_rank():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    return dict(prefix=_prefix_combine(rank), **_ops(rank))


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_on_rank, RANKS, timeout=240)


def test_prefix_combine_matches_the_sequential_recurrence(results):
    for r in results:
        for name, (got, want) in r["prefix"].items():
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("op", ["scan", "conv", "attention"])
def test_sequence_ops_over_slices_match_the_whole_sequence(results, op):
    for rank, r in enumerate(results):
        for name, (got, want) in r[op].items():
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"rank {rank} {name}: {m}")


LONG = 4096


def _long_sequence(cp: int):
    """One training step of a tiny MoE-Mamba on one 4096-token packed row; its loss and full gradients."""
    cfg = config_from_dict({
        "model": {"pattern": "MEMA", "d_model": 8, "d_state": 4, "num_experts": 2, "capacity_factor": 0.75,
                  "vocab_size": 64, "num_heads": 2},
        "parallel": {"context_parallel_size": cp},
        "data": {"mock": True, "seq_length": LONG},
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "seed": 3},
        "optimizer": {"lr": 1e-3, "lr_warmup_iters": 0}})
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    runner = make_runner(model, cfg, topo)
    tokens = torch.randint(0, 64, (1, LONG + 1), generator=torch.Generator().manual_seed(4))
    tokens = torch.where(tokens % 16 == 3, 3, tokens)  # documents of ~16 tokens, EOD 3
    batch = add_document_fields(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, LONG)),
                                3, True, True, True)
    record = train_step(runner, build_optimizer(model, cfg.optimizer, topo.device), [batch], cfg, topo, lr=1e-3)
    grads = full_tensors(dict(model.named_parameters()), topo, grads=True)
    return dict(loss=record["loss"], dropped=record["fraction_dropped"], grads=grads)


def test_a_4096_token_sequence_over_cp2_matches_one_process():
    try:
        want = _long_sequence(1)
    finally:
        destroy_distributed()
    got = run_on_ranks(_long_sequence, 2, args=(2,), timeout=300)
    assert want["dropped"] > 0
    for r in got:
        assert r["loss"] == pytest.approx(want["loss"], rel=1e-5) and r["dropped"] == want["dropped"]
        for name, g in want["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

"""Every layout trains the same model: TP, EP, DP and TP x EP give one process's losses and gradients.

Same seed, same data, fp32; Switch capacity small enough that tokens are dropped. Each layout runs 3
optimizer steps; losses must match one process within 1e-5 relative, and the gradients after step 1,
gathered to full shape, within float32 tolerance; so must a validation loss after the last step.
"""
import pytest
import torch

from megamoe.config import config_from_dict
from megamoe.data.packing import add_document_fields
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.comm import COUNTER
from megamoe.parallel.distributed_optimizer import ParamOwners
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import evaluate, make_runner, train_step
from megamoe.training.optimizer import build_optimizer

STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, EOD = 3, 4, 1, 16, 64, 3


def _config(layout: dict):
    """The test model in `layout`: parallel config keys (tensor_model_parallel_size, ...), plus zero (ZeRO-1),
    grouped (the experts' grouped GEMM, else their loop) and recompute (activation recompute method)."""
    parallel = {k: v for k, v in layout.items() if k not in ("zero", "grouped", "recompute", "packed", "projections")}
    recompute = layout["recompute"]
    return config_from_dict({
        "model": {"pattern": "MEMEAF", "d_model": 32, "d_state": 8, "num_experts": 4, "capacity_factor": 0.75,
                  "vocab_size": VOCAB, "num_heads": 4, "z_loss_weight": 0.001,
                  "mamba_moe_projections": ["conv", "gate", "output"] if layout["projections"] else []},
        "parallel": parallel,
        "data": {"mock": True, "seq_length": SEQ},
        "training": {"micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH, "seed": 5,
                     "moe_grouped_gemm": layout["grouped"], "recompute_granularity": recompute and "full",
                     "recompute_method": recompute or "uniform"},
        "optimizer": {"lr": 1e-2, "lr_warmup_iters": 0}})


def layout(tp=1, ep=1, pp=1, vpp=None, schedule="1f1b", sp=False, etp=None, zero=False, grouped=True,
           recompute=None, packed=False, cp=1, projections=False) -> dict:
    """packed: rows of several documents with --reset-position-ids --reset-attention-mask --eod-mask-loss;
    projections: the Mamba layers' projections are MoE too (model.mamba_moe_projections)."""
    return dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp, pipeline_schedule=schedule, sequence_parallel=sp,
                expert_tensor_parallel_size=etp, context_parallel_size=cp, zero=zero, grouped=grouped,
                recompute=recompute, packed=packed, projections=projections)


def _global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return tokens


def _my_micro_batches(step, dp_rank, dp, packed=False):
    """Megatron's order: micro-batch j of DP rank r holds samples j*mbs*dp + r*mbs ... + mbs. packed: about one
    token in eight is EOD (3), and the rows carry the packed-document fields."""
    tokens = _global_batch(step)
    if packed:
        tokens = torch.where(tokens % 8 == EOD, EOD, tokens)
    out = []
    for j in range(GLOBAL_BATCH // (MICRO_BATCH * dp)):
        start = j * MICRO_BATCH * dp + dp_rank * MICRO_BATCH
        sample = tokens[start:start + MICRO_BATCH]
        batch = dict(tokens=sample[:, :-1], labels=sample[:, 1:], loss_mask=torch.ones(MICRO_BATCH, SEQ))
        out.append(add_document_fields(batch, EOD, True, True, True) if packed else batch)
    return out


def _train(spec: dict):
    cfg = _config(spec)
    zero = spec["zero"]
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    runner = make_runner(model, cfg, topo)
    owners = ParamOwners(model.parameters(), topo) if zero else None
    optimizer = build_optimizer(model, cfg.optimizer, topo.device, keep=owners.owns if zero else None)
    losses, dropped, grads = [], [], None
    for step in range(STEPS):
        record = train_step(runner, optimizer, _my_micro_batches(step, topo.dp_rank, topo.dp, spec["packed"]), cfg,
                            topo, lr=1e-2, owners=owners)
        losses.append(record["loss"])
        dropped.append(record["fraction_dropped"])
        if step == 0:
            # The last stage's copy of the tied embedding is not a parameter of its own: its gradient was
            # summed into the first stage's embedding, which the comparison checks.
            named = {n: p for n, p in model.named_parameters() if not getattr(p, "shared_embedding_copy", False)}
            grads = full_tensors(named, topo, grads=True)
    valid = evaluate(runner, _my_micro_batches(STEPS, topo.dp_rank, topo.dp, spec["packed"]), cfg, topo)
    state_numel = sum(t.numel() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
    return dict(losses=losses, dropped=dropped, grads=grads, valid=valid, state_numel=state_numel, cp=topo.cp,
                cp_calls=sum(n for kind, n in COUNTER.calls.items() if kind.startswith("cp_")))


@pytest.fixture(scope="module")
def reference():
    try:
        return _train(layout())
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def reference_packed():
    try:
        return _train(layout(packed=True))
    finally:
        destroy_distributed()


def _check(results, reference):
    assert all(d > 0 for d in reference["dropped"]), "capacity should drop tokens in this test"
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
        assert r["valid"] == pytest.approx(reference["valid"], rel=1e-5)  # validation after the 3 steps
        assert r["grads"].keys() == reference["grads"].keys()
        for name, g in reference["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# The reference runs the experts as one grouped GEMM (where torch has it); EP2-loop runs them one by one.
TWO_RANKS = {"TP2": layout(tp=2), "EP2": layout(ep=2), "EP2-loop": layout(ep=2, grouped=False), "DP2": layout(),
             "TP2-SP": layout(tp=2, sp=True),
             "TP2-ETP1": layout(tp=2, etp=1), "PP2-1F1B": layout(pp=2),
             "PP2-interleaved": layout(pp=2, vpp=2, schedule="interleaved_1f1b"),
             "PP2-zero-bubble": layout(pp=2, vpp=2, schedule="zero_bubble"),
             "EP2-recompute": layout(ep=2, recompute="uniform"),
             "PP2-zero-bubble-recompute": layout(pp=2, vpp=2, schedule="zero_bubble", recompute="block")}
FOUR_RANKS = {"TP2xEP2": layout(tp=2, ep=2), "PP2xEP2": layout(ep=2, pp=2), "TP2xPP2": layout(tp=2, pp=2),
              "TP2xEP2-SP": layout(tp=2, ep=2, sp=True), "TP2xPP2-SP": layout(tp=2, pp=2, sp=True),
              "TP2xEP2-ETP1": layout(tp=2, ep=2, etp=1),
              "TP2xEP2-SP-recompute": layout(tp=2, ep=2, sp=True, recompute="uniform")}


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_rank_layouts_match_one_process(name, reference):
    _check(run_on_ranks(_train, 2, args=(TWO_RANKS[name],), timeout=300), reference)


def test_zero1_distributed_optimizer_shards_state_and_matches(reference):
    results = run_on_ranks(_train, 2, args=(layout(ep=2, zero=True),), timeout=300)  # EP 2, DP 2, ZeRO-1
    _check(results, reference)
    full = reference["state_numel"]
    assert all(0.3 * full < r["state_numel"] < 0.7 * full for r in results)
    assert sum(r["state_numel"] for r in results) - full < 0.01 * full  # experts are not replicated: ~no overlap


# Packed documents (--reset-position-ids --reset-attention-mask --eod-mask-loss): the layouts that carry them
# differently (TP shards the mixer's channels, SP gathers the sequence, PP hands each stage its own copy, EP
# moves tokens away from their rows).
PACKED = {"TP2": layout(tp=2, packed=True), "EP2": layout(ep=2, packed=True), "PP2": layout(pp=2, packed=True),
          "PP2-interleaved-recompute": layout(pp=2, vpp=2, schedule="interleaved_1f1b", recompute="uniform",
                                              packed=True)}


@pytest.mark.parametrize("name", PACKED)
def test_packed_documents_in_every_layout_match_one_process(name, reference_packed, reference):
    assert reference_packed["losses"] != reference["losses"]  # the flags change the function
    _check(run_on_ranks(_train, 2, args=(PACKED[name],), timeout=300), reference_packed)


@pytest.mark.slow
def test_packed_documents_under_tp2_sequence_parallel_x_ep2(reference_packed):
    _check(run_on_ranks(_train, 4, args=(layout(tp=2, ep=2, sp=True, packed=True),), timeout=400), reference_packed)


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_layouts_match_one_process(name, reference):
    _check(run_on_ranks(_train, 4, args=(FOUR_RANKS[name],), timeout=400), reference)


@pytest.mark.slow
def test_tp2_x_pp2_x_ep2_on_eight_ranks_matches_one_process(reference):
    _check(run_on_ranks(_train, 8, args=(layout(tp=2, ep=2, pp=2),), timeout=600), reference)


# Context parallelism (--context-parallel-size): each rank holds a contiguous slice of every sequence; the conv
# halo, the scan's carried state, attention's keys and the MoE's routing cross the slices.
CONTEXT = {"CP2": layout(cp=2), "CP2-EP2": layout(cp=2, ep=2), "CP2-recompute": layout(cp=2, recompute="uniform"),
           "CP2-zero": layout(cp=2, zero=True)}


def _check_context(spec: dict, ranks: int, reference):
    results = run_on_ranks(_train, ranks, args=(spec,), timeout=400)
    assert all(r["cp"] == spec["context_parallel_size"] and r["cp_calls"] > 0 for r in results)  # it did split
    _check(results, reference)
    if spec["zero"]:  # ZeRO-1 shards the dense optimizer state over DP x CP
        assert all(r["state_numel"] < 0.7 * reference["state_numel"] for r in results)


@pytest.mark.parametrize("name", CONTEXT)
def test_context_parallel_layouts_match_one_process(name, reference):
    _check_context(CONTEXT[name], 2, reference)


def test_packed_documents_under_context_parallelism(reference_packed):
    _check_context(layout(cp=2, packed=True), 2, reference_packed)


def test_moe_projections_under_context_parallelism():
    """The MoE inside the Mamba projections (the paper's variants) counts its capacity over the whole sequence."""
    try:
        reference = _train(layout(projections=True))
    finally:
        destroy_distributed()
    _check_context(layout(cp=2, ep=2, projections=True), 2, reference)


CONTEXT_FOUR = {"CP2xTP2": layout(cp=2, tp=2), "CP2xTP2-SP": layout(cp=2, tp=2, sp=True),
                "CP2xEP2": layout(cp=2, ep=2), "CP2xPP2": layout(cp=2, pp=2), "CP2xDP2": layout(cp=2),
                "CP4": layout(cp=4)}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONTEXT_FOUR)
def test_four_rank_context_parallel_layouts_match_one_process(name, reference):
    _check_context(CONTEXT_FOUR[name], 4, reference)

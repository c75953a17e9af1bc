"""Every MoE routing option trains the same model in every layout: one process against EP2, TP2, DP2, PP2
interleaved 1F1B and PP2 zero-bubble with activation recompute, and CP2 (context parallelism: each rank routes
one slice of every sequence, capacity and losses counted over the whole micro-batch), on 2 gloo ranks each.

Same seed and data as test_layout_parity (4 sequences of 16 tokens a step, micro-batches of 1). Checked: the
losses of every step (1e-5 relative), the gradients after step 1, and each MoE layer's routing totals of every
step (tokens per expert, dropped and assignments exactly: gathered from every pipeline stage and expert rank,
counted once under recompute); with the expert bias, its value after each of 20 steps, exactly.
"""
import pytest
import torch

from megamoe.config import config_from_dict
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import make_runner, train_step
from megamoe.training.optimizer import build_optimizer
from tests.parallel.test_layout_parity import GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, _my_micro_batches, layout

# Each option set switches on several options; together they cover every one (the MoE projections need TP 1).
OPTIONS = {
    "top2-sigmoid-bias-shared-probs-seq": dict(top_k=2, router_score_function="sigmoid",
                                               router_enable_expert_bias=True, router_bias_update_rate=0.01,
                                               shared_expert_intermediate_size=8, token_drop_policy="probs",
                                               router_load_balancing_type="seq_aux_loss"),
    "global-aux-post-softmax-fine-grained-dropless": dict(num_experts=8, d_expert=8, top_k=2,
                                                          router_pre_softmax=False, capacity_factor=None,
                                                          router_load_balancing_type="global_aux_loss"),
    "expert-choice": dict(router_type="expert_choice", router_load_balancing_type="none"),
    "force-balancing-top2": dict(router_force_load_balancing=True, top_k=2, capacity_factor=0.5),
    "projections-dense-fallback": dict(pattern="MMMM", mamba_moe_projections=["gate", "output"],
                                       mamba_moe_dense_fallback=True, token_drop_policy="probs", capacity_factor=0.5),
}
LAYOUTS = {"EP2": layout(ep=2), "TP2": layout(tp=2), "DP2": layout(),
           "PP2-interleaved": layout(pp=2, vpp=2, schedule="interleaved_1f1b"),
           "PP2-zero-bubble-recompute": layout(pp=2, vpp=2, schedule="zero_bubble", recompute="uniform")}
CASES = [(o, name) for o in OPTIONS for name in LAYOUTS if not (o.startswith("projections") and name == "TP2")]
# Context parallelism refuses expert choice and dropping by probability (both rank over the whole micro-batch).
CONTEXT_OPTIONS = {o: {**v, "token_drop_policy": "position"} for o, v in OPTIONS.items() if o != "expert-choice"}


def _config(options: dict, spec: dict):
    parallel = {k: v for k, v in spec.items() if k not in ("zero", "grouped", "recompute", "packed", "projections")}
    model = {"pattern": "MEME", "d_model": 16, "d_state": 4, "num_experts": 4, "capacity_factor": 0.75,
             "vocab_size": VOCAB, "z_loss_weight": 0.001, **options}
    return config_from_dict({
        "model": model, "parallel": parallel, "data": {"mock": True, "seq_length": SEQ},
        "training": {"micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH, "seed": 5,
                     "recompute_granularity": spec["recompute"] and "full",
                     "recompute_method": spec["recompute"] or "uniform"},
        "logging": {"moe_per_layer_logging": True},
        "optimizer": {"lr": 1e-2, "lr_warmup_iters": 0}})


def _train(options: dict, spec: dict) -> dict:
    cfg = _config(options, spec)
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    runner = make_runner(model, cfg, topo)
    optimizer = build_optimizer(model, cfg.optimizer, topo.device)
    steps = 20 if cfg.model.router_enable_expert_bias else 3
    out = dict(losses=[], tables=[], biases=[], grads=None, cp=topo.cp)
    for step in range(steps):
        record = train_step(runner, optimizer, _my_micro_batches(step, topo.dp_rank, topo.dp), cfg, topo, lr=1e-2)
        out["losses"].append(record["loss"])
        out["tables"].append(record["moe_layer_table"])
        if step == 0:
            named = {n: p for n, p in model.named_parameters() if not getattr(p, "shared_embedding_copy", False)}
            out["grads"] = full_tensors(named, topo, grads=True)
        if cfg.model.router_enable_expert_bias:
            out["biases"].append(full_tensors({n: b for n, b in model.named_buffers() if "expert_bias" in n}, topo))
    return out


_REFERENCES: dict = {}


def _reference(option: str, options: dict = OPTIONS) -> dict:
    key = (option, options is OPTIONS)
    if key not in _REFERENCES:
        try:
            _REFERENCES[key] = _train(options[option], layout())
        finally:
            destroy_distributed()
    return _REFERENCES[key]


@pytest.mark.slow
@pytest.mark.parametrize("option,name", CASES)
def test_routing_option_matches_one_process(option, name):
    reference = _reference(option)
    if option.startswith("top2-sigmoid-bias"):
        assert len(reference["biases"]) == 20 and reference["biases"][-1]
        assert all(b.abs().sum() > 0 for b in reference["biases"][-1].values())  # the bias moved
    _check(run_on_ranks(_train, 2, args=(OPTIONS[option], LAYOUTS[name]), timeout=400), reference)


@pytest.mark.slow
@pytest.mark.parametrize("option", CONTEXT_OPTIONS)
def test_routing_option_under_context_parallelism_matches_one_process(option):
    reference = _reference(option, CONTEXT_OPTIONS)
    results = run_on_ranks(_train, 2, args=(CONTEXT_OPTIONS[option], layout(cp=2)), timeout=400)
    assert all(r["cp"] == 2 for r in results)
    _check(results, reference)


def _check(results: list, reference: dict) -> None:
    experts = reference["tables"][0].shape[1] - 4
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
        for table, ref in zip(r["tables"], reference["tables"]):
            assert torch.equal(table[:, :experts + 2], ref[:, :experts + 2])  # tokens per expert, dropped, assigned
            torch.testing.assert_close(table[:, experts + 2:], ref[:, experts + 2:], rtol=1e-5, atol=1e-6)
        for step, (bias, ref) in enumerate(zip(r["biases"], reference["biases"])):
            assert bias.keys() == ref.keys()
            for key in ref:
                assert torch.equal(bias[key], ref[key]), f"{key} after step {step + 1}"
        assert r["grads"].keys() == reference["grads"].keys()
        for key, g in reference["grads"].items():
            torch.testing.assert_close(r["grads"][key], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")

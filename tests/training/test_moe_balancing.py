"""Balancing over the global batch and per-layer routing metrics, through the training step and loop.

- global_aux_loss gives the same loss and gradients whatever the micro-batch split of the same global batch
  (while the per-micro-batch aux_loss does not);
- the non-finite tracer names the right micro-batch after global_aux_loss's pre-pass;
- --moe-per-layer-logging on PP2 (2 ranks): rank 0 writes every MoE layer's routing, its own stage's and the
  other's, to metrics.jsonl and TensorBoard, counted over the global batches of the log interval.
"""
import math
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamoe.config import config_from_dict
from megamoe.logging import read_metrics
from megamoe.model import build_model
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import run_on_ranks
from megamoe.training import make_runner, train, train_step
from megamoe.training.nonfinite import NonFiniteProbe
from megamoe.training.optimizer import build_optimizer

VOCAB, SEQ, GLOBAL = 64, 16, 4


def _config(micro: int, balancing: str, **model):
    return config_from_dict({
        "model": {"pattern": "MEME", "d_model": 16, "d_state": 4, "num_experts": 4, "top_k": 2,
                  "capacity_factor": 0, "vocab_size": VOCAB, "load_balancing_weight": 0.1,
                  "router_load_balancing_type": balancing, **model},
        "data": {"mock": True, "seq_length": SEQ},
        "training": {"micro_batch_size": micro, "global_batch_size": GLOBAL, "seed": 3},
        "optimizer": {"lr": 1e-2, "lr_warmup_iters": 0}})


def _step(micro: int, balancing: str) -> tuple:
    """One step over the same 4 sequences cut into micro-batches of `micro`: (loss, aux loss, gradients)."""
    cfg = _config(micro, balancing)
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_parallel_model(cfg, topo)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(micro, SEQ)) for t in tokens.split(micro)]
    record = train_step(make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device), batches,
                        cfg, topo, lr=0.0)  # lr 0: the gradients are what the step computed
    return record["loss"], record["aux_loss"], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_global_batch_balancing_is_the_same_whatever_the_micro_batch_split():
    try:
        runs = {micro: _step(micro, "global_aux_loss") for micro in (1, 2, 4)}
        per_micro = {micro: _step(micro, "aux_loss")[1] for micro in (1, 4)}
    finally:
        destroy_distributed()
    loss, aux, grads = runs[4]  # one micro-batch: the global batch itself
    for micro in (1, 2):
        assert runs[micro][0] == pytest.approx(loss, rel=1e-6)
        assert runs[micro][1] == pytest.approx(aux, rel=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(runs[micro][2][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert per_micro[4] == pytest.approx(aux, rel=1e-6)  # the same loss when the micro-batch is the global batch
    assert per_micro[1] != pytest.approx(aux, rel=1e-3)  # ... and not over smaller micro-batches


def _pp2_run(log_dir: str) -> dict:
    cfg = _config(1, "aux_loss", capacity_factor=1.0)
    cfg.parallel.pipeline_model_parallel_size = 2
    cfg.training.train_iters, cfg.logging.log_interval, cfg.logging.log_dir = 4, 2, log_dir
    cfg.logging.moe_per_layer_logging = True
    return train(cfg)


@pytest.mark.slow
def test_per_layer_routing_metrics_come_from_every_pipeline_stage(tmp_path):
    summary = run_on_ranks(_pp2_run, 2, args=(str(tmp_path),), timeout=300)[0]
    records = [r for r in read_metrics(summary["metrics"]) if "lm_loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for name in ("layers.1.moe", "layers.3.moe"):  # on stages 0 and 1: rank 0 holds only the first
        for r in records:
            load = r[f"moe/{name}/tokens_per_expert"]
            assert sum(load) == 2 * GLOBAL * SEQ * 2  # 2 steps of the global batch, top-2, before dropping
            assert r[f"moe/{name}/load_max_over_mean"] == pytest.approx(max(load) / (sum(load) / 4))
            assert 0 <= r[f"moe/{name}/fraction_dropped"] < 1
            assert 0 < r[f"moe/{name}/router_entropy"] <= math.log(4) + 1e-6
    events = EventAccumulator(os.path.join(summary["log_dir"], "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"moe/layers.3.moe/router_entropy", "moe/layers.3.moe/tokens_per_expert/0",
            "moe/layers.1.moe/fraction_dropped"} <= tags


def test_a_nonfinite_gradient_is_named_by_its_micro_batch_after_a_routing_pre_pass():
    """global_aux_loss's forward-only pre-pass counts its own micro-batches: a gradient that goes non-finite in
    the step's second micro-batch is reported there, not in the fourth call of the model."""
    cfg = _config(2, "global_aux_loss")
    model = build_model(cfg.model, seed=1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with NonFiniteProbe(model, 0, [model]) as probe:
        with torch.no_grad():
            for _ in range(2):
                model(tokens)
        for micro in range(2):
            out = model(tokens, labels=tokens).lm_loss
            (out * (float("nan") if micro == 1 else 1.0)).backward()
    assert probe.first().micro_batch == 1

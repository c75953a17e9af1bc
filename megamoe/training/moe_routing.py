"""The training step's side of MoE routing: the global batch's expert counts for global_aux_loss, the expert-bias
update of aux-loss-free balancing, and the per-layer routing metrics (--moe-per-layer-logging).

All three read an MoE totals table (megamoe.model.MoETotals: one row per MoE layer of the whole model, tokens per
expert then dropped, assignments, entropy sum, tokens), summed over the step's micro-batches, the pipeline stages
(each fills its own layers' rows) and the data-parallel ranks (the expert-parallel ranks are among them; TP ranks
route the same tokens, so they are counted once). Every rank then holds the routing of the whole global batch.
The counts come from the forward passes (moe_summary after each forward), so the recomputed forwards of
activation recompute and of zero-bubble's weight passes never count twice.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megamoe.config import Config


def _sum_over_dp(table: torch.Tensor, topo) -> torch.Tensor:
    if topo.dp == 1:
        return table
    table = table.to(topo.device)
    dist.all_reduce(table, group=topo.dp_group)
    return table.cpu()


def _by_layer(model, names: list) -> list:
    """(row of the table, MoE layer) of this rank's MoE layers (its pipeline stages' under PP)."""
    row = {name: i for i, name in enumerate(names)}
    return [(row[m.layer_name], m) for m in model.moe_layers()]


@contextlib.contextmanager
def global_routing_counts(runner, batches: list, cfg: Config, topo):
    """With global_aux_loss: within, each MoE layer's load-balancing loss counts its expert fractions over the whole
    global batch, found by a forward-only routing pre-pass over `batches` (this rank's micro-batches, the routing
    the step will see: the weights do not change in between), summed over every rank. Its P_i stay the
    micro-batch's, so the micro-batch terms (each scaled as the LM loss is) add up to the global batch's loss under
    any micro-batch split and pipeline schedule. The pre-pass costs one forward of the step's micro-batches."""
    if cfg.model.router_load_balancing_type != "global_aux_loss" or not cfg.model.has_moe:
        yield
        return
    table = _sum_over_dp(runner.routing_prepass(batches), topo)
    layers = _by_layer(runner.model, runner.moe_layer_names)
    experts = cfg.model.num_experts
    for row, moe in layers:
        moe.global_counts = table[row, :experts].to(moe.router.weight.device)
    try:
        yield
    finally:
        for _, moe in layers:
            moe.global_counts = None


def update_expert_biases(model, names: list, table: torch.Tensor, rate: float) -> None:
    """After an optimizer step: every expert bias of this rank's MoE layers moves by `rate` against its layer's
    load in the step (tokens per expert before dropping, over the global batch); the same on every rank."""
    experts = table.shape[1] - 4
    for row, moe in _by_layer(model, names):
        if moe.router.expert_bias is not None:
            moe.router.update_expert_bias(table[row, :experts], rate)


def layer_metrics(names: list, table: torch.Tensor) -> dict:
    """Per MoE layer `moe/<name>/...`: tokens_per_expert (over the global batches summed in `table`),
    fraction_dropped, load_max_over_mean and router_entropy (mean over tokens, nats)."""
    experts = table.shape[1] - 4
    out = {}
    for name, row in zip(names, table):
        load = row[:experts]
        dropped, assignments, entropy, tokens = row[experts:].tolist()
        out[f"moe/{name}/tokens_per_expert"] = [round(float(n), 2) for n in load]
        out[f"moe/{name}/fraction_dropped"] = dropped / max(assignments, 1.0)
        out[f"moe/{name}/load_max_over_mean"] = float(load.max() / load.mean().clamp(min=1e-9))
        out[f"moe/{name}/router_entropy"] = entropy / max(tokens, 1.0)
    return out

"""One optimizer step: a step's micro-batches through the model (a plain loop, or the pipeline schedule), the
gradients reduced, clipped and applied; and validation with the same runner.

    runner = make_runner(model, cfg, topo)
    record = train_step(runner, optimizer, batches, cfg, topo, lr, owners, scaler)   -> step metrics
    loss   = evaluate(runner, batches, cfg, topo)
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.model import MoETotals, aux_loss_scale, moe_layer_names
from megamoe.parallel import Topology, get_rng_state, set_rng_state
from megamoe.parallel.context_parallel import local_batch, sum_over_cp
from megamoe.parallel.data_parallel import GradientReducer, clip_gradients
from megamoe.parallel.pipeline import Pipeline
from megamoe.parallel.te import fp8_context
from megamoe.training.guard import StepGuard
from megamoe.training.moe_routing import global_routing_counts, update_expert_biases


def _autocast(cfg: Config, device: torch.device):
    dtype = cfg.training.autocast_dtype
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def _mean_over_dp(values: torch.Tensor, topo: Topology) -> torch.Tensor:
    if topo.dp > 1:
        values = values.to(topo.device)
        dist.all_reduce(values, group=topo.dp_group)
        values = values / topo.dp
    return values.cpu()


def _reduce_over_dp(sums: torch.Tensor, table: torch.Tensor, topo: Topology) -> tuple:
    """One all-reduce over the data-parallel ranks: the mean of `sums`, the sum of the MoE totals `table`."""
    if topo.dp == 1:
        return sums, table
    values = torch.cat([sums, table.flatten()]).to(topo.device)
    dist.all_reduce(values, group=topo.dp_group)
    values = values.cpu()
    return values[:sums.numel()] / topo.dp, values[sums.numel():].view_as(table)


class MicroBatches:
    """Runs one step's micro-batches through the whole model, one after another (no pipeline)."""

    def __init__(self, model, cfg: Config, topo: Topology):
        self.model, self.cfg, self.topo = model, cfg, topo
        self.loss_scale = 1.0  # what the LM loss is multiplied by before backward (--fp16)
        self.moe_layer_names = moe_layer_names(cfg.model)

    def _forward(self, batch):
        batch = {k: v.to(self.topo.device, non_blocking=True) for k, v in batch.items()}  # from pinned memory
        batch = local_batch(batch, self.topo)
        return self.model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                          seq_idx=batch.get("seq_idx"), position_ids=batch.get("position_ids"))

    def forward_backward(self, batches: list) -> tuple:
        """Sums over micro-batches of [lm loss, aux loss, z loss], and the MoE totals table (MoETotals)."""
        moe = MoETotals(self.moe_layer_names, self.cfg.model.num_experts)
        self.micro_losses = []
        for batch in batches:
            out = self._forward(batch)
            (out.lm_loss * (self.loss_scale / len(batches))).backward()
            self.micro_losses.append(out.lm_loss.item())
            moe.add(out.aux_loss, out.z_loss, out.moe_stats)
        lm_loss = torch.tensor([sum(self.micro_losses)], dtype=torch.float64)
        return torch.cat([lm_loss, moe.losses]), moe.table

    @torch.no_grad()
    def routing_prepass(self, batches: list) -> torch.Tensor:
        """The MoE totals table of a forward-only pass over `batches` (the routing the step will see)."""
        moe = MoETotals(self.moe_layer_names, self.cfg.model.num_experts)
        for batch in batches:
            out = self._forward(batch)
            moe.add(out.aux_loss, out.z_loss, out.moe_stats)
        return moe.table

    def micro_batch_roots(self) -> list:
        """The modules called once per micro-batch (a NonFiniteProbe counts micro-batches by them)."""
        return [self.model]

    def sync_shared_grads(self) -> None:
        """Nothing is shared between stages without a pipeline."""

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        return sum(float(self._forward(b).lm_loss) for b in batches) / max(1, len(batches))


def make_runner(model, cfg: Config, topo: Topology):
    """What runs a step's micro-batches: the pipeline schedule under PP, else a plain loop."""
    if topo.pp > 1:
        tcfg = cfg.training
        runner = Pipeline(model, cfg, topo, tcfg.global_batch_size // (tcfg.micro_batch_size * topo.dp))
    else:
        runner = MicroBatches(model, cfg, topo)
    runner.reducer = GradientReducer(model.parameters(), topo)
    return runner


def _gradients(runner, batches: list, cfg: Config, topo: Topology) -> tuple:
    """Forward and backward of `batches`: the gradients reduced over data-parallel replicas, summed over tied
    copies, unscaled (--fp16) and clipped; returns (the step's [lm, aux, z] loss sums as means over DP, the MoE
    totals table summed over every rank (the global batch's routing), the global gradient norm before
    clipping), the same on every rank."""
    runner.model.zero_grad(set_to_none=True)
    runner.reducer.start(len(batches))
    start = time.perf_counter()
    # The MoE losses are scaled as the LM loss is: 1 / micro-batches (x the loss scale).
    with _autocast(cfg, topo.device), fp8_context(cfg, topo), aux_loss_scale(runner.loss_scale / len(batches)), \
            global_routing_counts(runner, batches, cfg, topo):
        sums, table = runner.forward_backward(batches)
    sums[:1] = sum_over_cp(sums[:1], topo)  # the LM loss: every CP rank's share of its micro-batch
    runner.fwd_bwd_s = time.perf_counter() - start  # this rank's, before it waits for the others' gradients
    runner.reducer.finish()
    runner.sync_shared_grads()
    params = [p for p in runner.model.parameters() if p.requires_grad]
    if runner.loss_scale != 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, runner.loss_scale)
    grad_norm = clip_gradients(params, cfg.optimizer.clip_grad, topo)
    return (*_reduce_over_dp(sums, table, topo), grad_norm)


def _record(sums: torch.Tensor, table: torch.Tensor, grad_norm: float, lr: float, micro_batches: int,
            dp: int) -> dict:
    lm, aux, z = (sums / micro_batches).tolist()
    record = dict(loss=lm + aux + z, lm_loss=lm, aux_loss=aux, z_loss=z, lr=lr, grad_norm=grad_norm)
    experts = table.shape[1] - 4
    dropped, assignments = table[:, experts:experts + 2].sum(0).tolist()
    if assignments > 0:
        load = table[:, :experts].sum(0) / dp
        record["fraction_dropped"] = dropped / assignments
        record["expert_load_max_over_mean"] = float(load.max() / load.mean().clamp(min=1e-9))
        record["tokens_per_expert"] = [round(float(n), 2) for n in load]  # summed over MoE layers, mean over DP
    return record


def train_step(runner, optimizer, batches, cfg: Config, topo: Topology, lr: float, owners=None,
               scaler=None, guard: Optional[StepGuard] = None, samples: Optional[list] = None) -> dict:
    """One optimizer step over `batches` (this rank's micro-batches); returns step metrics.
    `owners` (ZeRO-1): the optimizer steps only this rank's parameters, then they are broadcast.
    `scaler` (--fp16): the losses are multiplied by its scale, the gradients divided by it after reduction,
    and a step whose gradient norm is not finite is skipped (on every rank: the norm is global).
    `guard`: a step with a non-finite loss or gradient is skipped and traced (record["nonfinite"]), a spike
    reported (record["spike"]; `samples` names each micro-batch's samples there) and, as configured, re-run."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    runner.loss_scale = scaler.scale if scaler else 1.0
    rng = get_rng_state() if guard is not None and guard.rerun_spikes else None
    sums, table, grad_norm = _gradients(runner, batches, cfg, topo)
    record = _record(sums, table, grad_norm, lr, len(batches), topo.dp)
    record["fwd_bwd_s"] = runner.fwd_bwd_s
    trouble = guard.trouble(record, fp16=scaler is not None) if guard is not None else None
    if trouble == "nonfinite":
        record["nonfinite"] = guard.locate(lambda: _gradients(runner, batches, cfg, topo), runner.model,
                                           runner.micro_batch_roots(), topo.rank)
    elif trouble == "spike":
        record["spike"] = guard.spike(record, runner.micro_losses, samples)
        if rng is not None:  # the same state again: weights untouched, generators back, the same micro-batches
            set_rng_state(rng)
            sums, table, grad_norm = _gradients(runner, batches, cfg, topo)
            first, spike = record["loss"], record["spike"]
            record = dict(_record(sums, table, grad_norm, lr, len(batches), topo.dp), fwd_bwd_s=runner.fwd_bwd_s,
                          first_loss=first)
            record["spike"] = spike + ("; re-run: the same loss again (deterministic: the data or the model)"
                                       if record["loss"] == first else
                                       f"; re-run: loss {record['loss']:.4f} this time (transient: a hardware fault "
                                       "or non-determinism); the step goes on with the re-run")
    overflow = scaler is not None and not math.isfinite(grad_norm) and trouble != "nonfinite"
    skipped = overflow or trouble == "nonfinite"
    if not skipped:
        optimizer.step()
        if owners is not None:
            owners.broadcast()
        if cfg.model.router_enable_expert_bias:  # from the step's routing, the same on every rank
            update_expert_biases(runner.model, runner.moe_layer_names, table, cfg.model.router_bias_update_rate)
    if cfg.logging.moe_per_layer_logging:
        record["moe_layer_table"] = table
    if scaler:
        scaler.update(overflow=skipped)
        record.update(loss_scale=runner.loss_scale)
    if scaler or trouble == "nonfinite":
        record["skipped_step"] = int(skipped)  # the LR schedule counts only the steps that updated
    if trouble == "nonfinite":
        record["nonfinite_step"] = 1
    return record


def evaluate(runner, batches, cfg: Config, topo: Topology) -> float:
    """Mean LM loss over the given validation micro-batches, averaged over data-parallel ranks."""
    runner.model.eval()
    try:
        with _autocast(cfg, topo.device), fp8_context(cfg, topo):
            loss = runner.evaluate(batches)
    finally:
        runner.model.train()
    return float(_mean_over_dp(sum_over_cp(torch.tensor([loss], dtype=torch.float64), topo), topo))

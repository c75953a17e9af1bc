"""Pipeline parallelism: the block stack split into stages, run by torch.distributed.pipelining schedules.

megatron-core's schedules allocate on CUDA (PLATFORM.md), so the schedules are torch's (1F1B, interleaved
1F1B with virtual stages, interleaved zero-bubble) over megatron-core's pipeline group.

- Stages: `stage_blocks` splits the blocks into PP x VPP contiguous stages, at the pattern's `|` marks when it
  has them, else balanced by each block's active parameters (FLOPs per token) with the LM head on the last
  stage. Stage s runs on pipeline rank s % PP (interleaved "loop" order), and a rank's model is one MambaLM
  holding the blocks of all its stages, so parameter names, checkpoints and the optimizer do not change.
- Losses: the last stage computes the LM loss per micro-batch (scaled by 1 / micro-batches); the MoE losses
  reach the backward of their own stage through `attach_aux_loss`, never crossing stages.
- Tied embeddings: the last stage holds a copy of the embedding as its head; their gradients are summed over
  megatron-core's embedding group after the backward, so the copies stay equal.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from megamoe.config import Config, ModelConfig
from megamoe.config.pattern import check_stages, marked_stages
from megamoe.model import (
    MambaLM,
    MoETotals,
    SwitchMoE,
    active_parameters,
    masked_mean,
    meta_model,
    moe_layer_names,
    moe_summary,
)
from megamoe.parallel.context_parallel import local_batch


def block_costs(cfg: ModelConfig) -> list:
    """Active parameters of each block: proportional to its FLOPs per token."""
    return [active_parameters(block) for block in meta_model(cfg).layers.values()]


def _balanced_split(costs: list, parts: int, tail: float) -> list:
    """Contiguous split of `costs` into `parts` non-empty runs minimising the largest run (+ `tail` on the
    last run). Dynamic programming over split points; block counts are small."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for end in range(k, n + 1):
            extra = tail if (k == parts and end == n) else 0.0
            for start in range(k - 1, end):
                value = max(best[k - 1][start], prefix[end] - prefix[start] + extra)
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    bounds, end = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][end], end))
        end = cut[k][end]
    return [list(range(a, b)) for a, b in reversed(bounds)]


def stage_blocks(cfg: Config) -> list:
    """Global block indices of each of the PP x VPP stages, in pipeline order."""
    pp, virtual = cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_stages
    check_stages(cfg.model, pp, virtual)
    if "|" in cfg.model.pattern:
        return marked_stages(cfg.model, pp, virtual)
    head = cfg.model.d_model * (cfg.model.vocab_size or 0)
    return _balanced_split(block_costs(cfg.model), pp * virtual, head)


def _on(t, device):
    return t.to(device) if t is not None else None


class PipelineChunk(nn.Module):
    """One pipeline stage's view of this rank's MambaLM: its blocks (registered here too, shared), plus the
    embedding on the first stage and the final norm + head on the last."""

    def __init__(self, lm: MambaLM, blocks: list, first: bool, last: bool, layer_names: list):
        super().__init__()
        self.first, self.last, self.layer_names = first, last, layer_names
        self.blocks = nn.ModuleList([lm.layers[str(i)] for i in blocks])
        if first:
            self.embedding = lm.embedding
        if last:
            self.norm_f, self.lm_head = lm.norm_f, lm.lm_head
        self.moe_totals = MoETotals(layer_names, lm.cfg.num_experts)  # this chunk's MoE layers, a step's micro-batches
        # (seq_idx, position_ids) of the micro-batches to come, in order: every stage reads them from its own copy
        # of the data, so they never ride the activations sent between stages
        self.documents = collections.deque()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_idx, position_ids = self.documents.popleft() if self.documents else (None, None)
        h = self.embedding(x) if self.first else x
        for block in self.blocks:
            h = block(h, seq_idx, position_ids)
        if self.training:
            self.moe_totals.add(*moe_summary([m for b in self.blocks for m in b.modules() if isinstance(m, SwitchMoE)]))
        return self.lm_head(self.norm_f(h)).float() if self.last else h


def _schedule_class(name: str, virtual: int):
    if name == "1f1b" and virtual == 1:
        return pipelining.Schedule1F1B
    if name in ("1f1b", "interleaved_1f1b"):
        return pipelining.ScheduleInterleaved1F1B
    return pipelining.ScheduleInterleavedZeroBubble


class Pipeline:
    """This rank's stages and the schedule that runs them; `forward_backward` runs one optimizer step's
    micro-batches and returns the step's loss sums, the same on every rank of the pipeline."""

    def __init__(self, lm: MambaLM, cfg: Config, topo, num_micro: int):
        self.model, self.lm, self.cfg, self.topo, self.num_micro = lm, lm, cfg, topo, num_micro
        self.loss_scale = 1.0  # what the LM loss is multiplied by before backward (--fp16)
        stages = stage_blocks(cfg)
        self.virtual = len(stages) // topo.pp
        mine = list(range(topo.pp_rank, len(stages), topo.pp))
        self.moe_layer_names = moe_layer_names(cfg.model)
        self.chunks = [PipelineChunk(lm, stages[s], s == 0, s == len(stages) - 1, self.moe_layer_names)
                       for s in mine]
        self.stages = [pipelining.PipelineStage(chunk, s, len(stages), topo.device, group=topo.pp_group,
                                     input_args=self._example(s == 0, "input"),
                                     output_args=self._example(s == len(stages) - 1, "output"))
                       for chunk, s in zip(self.chunks, mine)]
        self.lm_losses = []
        schedule = _schedule_class(cfg.parallel.pipeline_schedule, self.virtual)
        stage_arg = self.stages[0] if schedule.__name__ == "Schedule1F1B" else self.stages
        # The loss is already divided by the number of micro-batches: no further gradient scaling.
        self.schedule = schedule(stage_arg, n_microbatches=num_micro, loss_fn=self._loss, scale_grads=False)

    def _example(self, end: bool, kind: str) -> torch.Tensor:
        """Shapes the stages exchange, given up front (static mode: no inference forward, whose MoE routing
        would also count in the step's statistics): tokens into the first stage, logits out of the last
        (this rank's vocabulary shard, float32), hidden states (float32, the residual stream) otherwise."""
        shape = (self.cfg.training.micro_batch_size, self.cfg.data.seq_length // self.topo.cp)
        if end and kind == "input":
            return torch.empty(shape, dtype=torch.long, device="meta")
        if not end and self.cfg.parallel.sequence_parallel:  # hidden states hold this rank's 1/TP of the sequence
            shape = (shape[0], shape[1] // self.topo.tp)
        width = self.cfg.model.vocab_size // self.topo.tp if end else self.cfg.model.d_model
        return torch.empty(shape + (width,), dtype=torch.float32, device="meta", requires_grad=True)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target: (batch, 2, L) = labels and loss mask, packed so the schedule splits them together."""
        lm_loss = masked_mean(self.lm.cross_entropy(logits, target[:, 0]), target[:, 1], self.lm.count_tokens)
        self.lm_losses.append(lm_loss.detach())
        return lm_loss * (self.loss_scale / self.num_micro)

    def _run(self, batches: list, train: bool) -> None:
        device = self.topo.device
        batches = [local_batch({k: v.to(device) for k, v in b.items()}, self.topo) for b in batches]
        tokens = torch.cat([b["tokens"] for b in batches]).to(device)
        target = torch.cat([torch.stack([b["labels"], b["loss_mask"].long()], 1) for b in batches]).to(device)
        first, last = self.topo.is_first_stage, self.topo.is_last_stage
        for chunk in self.chunks:  # every schedule runs a stage's micro-batches in order
            chunk.documents = collections.deque(
                (_on(b.get("seq_idx"), device), _on(b.get("position_ids"), device)) for b in batches)
        args = (tokens,) if first else ()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target if last else None)

    def _reset_totals(self) -> None:
        for chunk in self.chunks:
            chunk.moe_totals = MoETotals(self.moe_layer_names, self.cfg.model.num_experts)

    def forward_backward(self, batches: list) -> tuple:
        """Sums over micro-batches of [lm loss, aux loss, z loss], and the MoE totals table (MoETotals); the same
        on every rank of the pipeline."""
        self.lm_losses.clear()
        self._reset_totals()
        self._run(batches, train=True)
        return self._gather_totals()

    @torch.no_grad()
    def routing_prepass(self, batches: list) -> torch.Tensor:
        """The MoE totals table of a forward-only pass over `batches` (the routing the step will see), the same
        on every rank of the pipeline."""
        self._reset_totals()
        self._run(batches, train=False)
        self.lm_losses.clear()
        return self._gather_totals()[1]

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        """Mean LM loss over `batches` (a multiple of the training micro-batch count), on every pipeline rank."""
        self.lm_losses.clear()
        for start in range(0, len(batches), self.num_micro):
            self._run(batches[start:start + self.num_micro], train=False)
        total = torch.tensor([float(sum(self.lm_losses)), float(len(self.lm_losses))], dtype=torch.float64,
                             device=self.topo.device)  # NCCL reduces device tensors only
        dist.all_reduce(total, group=self.topo.pp_group)
        return float(total[0] / total[1].clamp(min=1))

    @property
    def micro_losses(self) -> list:
        """This rank's LM loss of each micro-batch of the last step (the last stage's; empty elsewhere)."""
        return [float(loss) for loss in self.lm_losses]

    def micro_batch_roots(self) -> list:
        """The modules called once per micro-batch (a NonFiniteProbe counts micro-batches by them)."""
        return list(self.chunks)

    def sync_shared_grads(self) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies (after DP averaging)."""
        if not (self.cfg.model.tie_embeddings and self.topo.in_embedding_group):
            return
        weight = self.lm.embedding.weight if self.topo.is_first_stage else self.lm.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=self.topo.embedding_group)

    def _gather_totals(self) -> tuple:
        """The last stage's LM losses and every chunk's MoE totals, summed over the pipeline group."""
        table = sum(chunk.moe_totals.table for chunk in self.chunks)
        sums = torch.zeros(3 + table.numel(), dtype=torch.float64)
        sums[0] = float(sum(self.lm_losses))
        for chunk in self.chunks:
            sums[1:3] += chunk.moe_totals.losses
        sums[3:] = table.flatten()
        sums = sums.to(self.topo.device)
        dist.all_reduce(sums, group=self.topo.pp_group)
        sums = sums.cpu()
        return sums[:3], sums[3:].view_as(table)


def stage_model_args(cfg: Config, topo) -> dict:
    """What this pipeline rank builds: the blocks of its stages, the embedding on the first rank, the final
    norm and head on the last."""
    stages = stage_blocks(cfg)
    mine = sorted(b for s in range(topo.pp_rank, len(stages), topo.pp) for b in stages[s])
    return dict(blocks=mine, pre_process=topo.is_first_stage, post_process=topo.is_last_stage)


def mark_shared_embedding_copy(lm: MambaLM, topo) -> None:
    """The last stage's copy of a tied embedding is counted once (on the first stage) by the global norm."""
    if lm.cfg.tie_embeddings and topo.pp > 1 and lm.post_process and not lm.pre_process:
        lm.lm_head.weight.shared_embedding_copy = True

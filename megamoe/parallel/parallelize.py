"""Apply tensor and expert parallelism to a model from outside (torchtitan's `parallelize_*` pattern).

Every rank builds the same model from the same seed, block by block, and keeps its shard of each block as
soon as it is built, so every layout computes the same function:
- Mamba mixer: in_proj column-parallel with x and z each split by channel; conv1d, dt_proj, A_log, D on the
  local channels; x_proj row-parallel (its (dt, B, C) output all-reduced, and so is their gradient, since
  every rank's channels use them); out_proj row-parallel. The scan needs no communication.
- Attention by heads (qkv column, out row); dense FFN column then row.
- Switch MoE: router replicated; experts split over EP (all-to-all dispatch) and their width over ETP; a shared
  expert column then row over TP, as a dense FFN.
- Vocab-parallel embedding, LM head (tied to the embedding shard or its own) and cross entropy.
Linears are megatron-core's tensor-parallel layers, or Transformer Engine's when it is in use (te.py).

What splits and how is the sharding plan (plan.py), the same table offline re-sharding reads; this module only
applies it: a weight split on dim 0 becomes a column-parallel layer, on dim 1 a row-parallel one.

Sequence parallelism (`--sequence-parallel`): between the sublayers (norms, residual adds) each TP rank holds
1/TP of the sequence. A sublayer all-gathers its normed input along the sequence and reduce-scatters its
row-parallel output (instead of all-reducing it); a Switch MoE gathers, runs as without sequence parallelism
(its capacity counts the whole micro-batch) and keeps this rank's slice. Norm weights then see only part of
the sequence, so their gradients are summed over TP (GradientReducer).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch.nn.functional as F
from torch import nn

from megamoe.config import Config, block_kinds
from megamoe.model import Block, Experts, MambaLM, MambaMixer
from megamoe.parallel.context_parallel import parallelize_context
from megamoe.parallel.expert_parallel import parallelize_moe
from megamoe.parallel.pipeline import mark_shared_embedding_copy, stage_blocks, stage_model_args
from megamoe.parallel.plan import shard_spec_for
from megamoe.parallel.sharding import set_shard_spec, take_shard
from megamoe.parallel.te import FastPaths, fast_paths, fused_norm, te_linear
from megamoe.parallel.tensor_parallel import (
    ColumnParallel,
    RowParallel,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_sequence,
    reduce_scatter_sequence,
    scatter_sequence,
    vocab_parallel_cross_entropy,
)

MODES = {0: "column", 1: "row"}


def _shard_param(param: nn.Parameter, name: str, topo) -> nn.Parameter:
    spec = shard_spec_for(name, param.shape)
    return set_shard_spec(nn.Parameter(take_shard(param.detach(), spec, topo.tp_rank, topo.tp).clone()), spec)


def _parallel_linear(linear: nn.Linear, name: str, topo, paths: FastPaths, sequence_parallel: bool = False,
                     activation: str = "gelu"):
    """This rank's shard of `linear` (block-relative `name`, as the plan splits its weight): TE's layer,
    megatron-core's, or `linear` itself."""
    spec = shard_spec_for(f"{name}.weight", linear.weight.shape, activation)
    mode = MODES[spec.dim]
    if paths.te is not None:
        return te_linear(linear, topo, paths.te, mode, spec.partitions)
    if topo.tp == 1:
        return linear
    return (ColumnParallel if mode == "column" else RowParallel)(linear, topo, spec.partitions, sequence_parallel)


def _sequence_parallel_sublayer(module: nn.Module, topo, replicated: bool, bias=None) -> None:
    """Hooks that make `module` take and give (batch, L / TP, d): gather the sequence in; out, reduce-scatter
    its partial sums (+ the row-parallel bias), or keep this rank's slice of a replicated output (MoE)."""
    group = topo.tp_group
    module.register_forward_pre_hook(
        lambda m, args: (gather_sequence(args[0], group, grad_is_partial=not replicated),) + tuple(args[1:]))
    if replicated:
        module.register_forward_hook(lambda m, args, out: scatter_sequence(out, group))
    else:
        module.register_forward_hook(
            lambda m, args, out: reduce_scatter_sequence(out, group) + (0 if bias is None else bias))


def _mark_sequence_parallel(module: nn.Module) -> None:
    for p in module.parameters():
        p.sequence_parallel = True


def parallelize_mamba(mixer: MambaMixer, topo, paths: FastPaths, sp: bool = False) -> None:
    if topo.tp > 1:
        assert not mixer.moe_projections, "config validation rejects MoE projections with TP > 1"
    if hasattr(mixer, "in_proj"):
        mixer.in_proj = _parallel_linear(mixer.in_proj, "mixer.in_proj", topo, paths, sp)
    if isinstance(mixer.out_proj, nn.Linear):
        mixer.out_proj = _parallel_linear(mixer.out_proj, "mixer.out_proj", topo, paths, sp)
    if topo.tp == 1:
        return
    if sp:
        _sequence_parallel_sublayer(mixer, topo, replicated=False, bias=mixer.out_proj.bias)
    conv = mixer.conv1d
    local = mixer.d_inner // topo.tp
    mixer.conv1d = nn.Conv1d(local, local, conv.kernel_size[0], groups=local, padding=conv.padding[0],
                             bias=conv.bias is not None)
    mixer.conv1d.weight = _shard_param(conv.weight, "mixer.conv1d.weight", topo)
    if conv.bias is not None:
        mixer.conv1d.bias = _shard_param(conv.bias, "mixer.conv1d.bias", topo)
    # x_proj reads this rank's channels: row-parallel. Its (dt, B, C) output is then used whole by every rank,
    # so its gradient is all-reduced too (copy_to_tp on the output).
    mixer.x_proj = RowParallel(mixer.x_proj, topo)
    mixer.x_proj.register_forward_hook(lambda module, args, out: copy_to_tp(out, topo.tp_group))
    # dt_proj only lends its weight and bias (the bias is added inside the scan): plain local shards.
    dt_proj = nn.Linear(mixer.dt_rank, local)
    dt_proj.weight = _shard_param(mixer.dt_proj.weight, "mixer.dt_proj.weight", topo)
    dt_proj.bias = _shard_param(mixer.dt_proj.bias, "mixer.dt_proj.bias", topo)
    mixer.dt_proj = dt_proj
    mixer.A_log = _shard_param(mixer.A_log, "mixer.A_log", topo)
    mixer.D = _shard_param(mixer.D, "mixer.D", topo)


def parallelize_block(block: Block, topo, paths: FastPaths, sp: bool = False) -> Block:
    """Shard one block in place for `topo` (sequence-parallel when `sp` and TP > 1); returns it."""
    sp = sp and topo.tp > 1
    if hasattr(block, "mixer"):
        parallelize_mamba(block.mixer, topo, paths, sp)
        for name in ("conv_proj", "gate_proj", "out_proj"):
            moe = getattr(block.mixer, name, None)
            if moe is not None and hasattr(moe, "router"):
                parallelize_moe(moe, topo, f"mixer.{name}")
    if hasattr(block, "moe"):
        parallelize_moe(block.moe, topo, "moe")
        shared = getattr(block.moe, "shared", None)
        if shared is not None:  # inside the MoE, which reads the whole sequence: no sequence-parallel hooks of its own
            shared.fc1 = _parallel_linear(shared.fc1, "moe.shared.fc1", topo, paths, activation=shared.activation)
            shared.fc2 = _parallel_linear(shared.fc2, "moe.shared.fc2", topo, paths)
        if sp:
            _sequence_parallel_sublayer(block.moe, topo, replicated=True)
    if hasattr(block, "attention"):
        block.attention.qkv = _parallel_linear(block.attention.qkv, "attention.qkv", topo, paths, sp)
        block.attention.out_proj = _parallel_linear(block.attention.out_proj, "attention.out_proj", topo, paths, sp)
        if sp:
            _sequence_parallel_sublayer(block.attention, topo, replicated=False)
    if hasattr(block, "ffn"):
        block.ffn.fc1 = _parallel_linear(block.ffn.fc1, "ffn.fc1", topo, paths, sp, block.ffn.activation)
        block.ffn.fc2 = _parallel_linear(block.ffn.fc2, "ffn.fc2", topo, paths, sp)
        if sp:
            _sequence_parallel_sublayer(block.ffn, topo, replicated=False)
    for experts in (m for m in block.modules() if isinstance(m, Experts)):
        experts.grouped_gemm = paths.grouped_gemm
    if paths.apex_norms is not None:
        block.norm = fused_norm(block.norm, paths.apex_norms)
    if sp:
        _mark_sequence_parallel(block.norm)
    return block


class _TiedVocabParallelHead(nn.Module):
    """LM head that reuses the vocab-parallel embedding's shard: logits of this rank's vocabulary rows."""

    def __init__(self, embedding: VocabParallelEmbedding, topo, sequence_parallel: bool = False):
        super().__init__()
        self.embedding = [embedding]  # a list, so the shared weight is not registered twice
        self.tp_group = topo.tp_group
        self.sequence_parallel = sequence_parallel  # then the input arrives gathered, its gradient summed

    @property
    def weight(self):
        return self.embedding[0].weight

    def forward(self, h):
        return F.linear(h if self.sequence_parallel else copy_to_tp(h, self.tp_group), self.weight)


def parallelize_embeddings(model: MambaLM, topo, paths: FastPaths, sp: bool = False) -> None:
    """The vocab-parallel embedding, LM head and cross entropy (the plan splits both tables by vocabulary rows)."""
    if paths.apex_norms is not None and model.post_process:
        model.norm_f = fused_norm(model.norm_f, paths.apex_norms)
    if topo.tp == 1:
        return
    for name in ("embedding.weight", "lm_head.weight"):  # what the vocab-parallel layers below implement
        assert shard_spec_for(name, (1, 1)).dim == 0, f"the plan splits {name} by vocabulary rows"
    tied = model.pre_process and model.post_process and model.lm_head.weight is model.embedding.weight
    if model.pre_process:
        model.embedding = VocabParallelEmbedding(model.embedding, topo)
        if sp:
            model.embedding.register_forward_hook(lambda m, args, out: scatter_sequence(out, topo.tp_group))
    if model.post_process:
        model.lm_head = (_TiedVocabParallelHead(model.embedding, topo, sp) if tied
                         else ColumnParallel(model.lm_head, topo, sequence_parallel=sp))
        model.cross_entropy = functools.partial(vocab_parallel_cross_entropy, tp_group=topo.tp_group)
        if sp:
            model.lm_head.register_forward_pre_hook(lambda m, args: (gather_sequence(args[0], topo.tp_group),))
            _mark_sequence_parallel(model.norm_f)


def build_parallel_model(cfg: Config, topo, paths: Optional[FastPaths] = None) -> MambaLM:
    """This rank's shard of the model (of its pipeline stages under PP), on topo.device."""
    paths = paths or fast_paths(cfg, topo.device)
    sp = cfg.parallel.sequence_parallel
    stage = stage_model_args(cfg, topo) if topo.pp > 1 else {}
    model = MambaLM(cfg.model, seed=cfg.training.seed,
                    block_hook=lambda b: parallelize_block(b, topo, paths, sp), **stage)
    parallelize_embeddings(model, topo, paths, sp)
    if topo.cp > 1:
        parallelize_context(model, topo)
    mark_shared_embedding_copy(model, topo)
    for index in recomputed_blocks(cfg) & set(map(int, model.layers)):
        model.layers[str(index)].recompute = True
    return model.to(topo.device)


def recomputed_blocks(cfg: Config) -> set:
    """Global indices of the blocks recomputed in backward (--recompute-granularity full): every block, or
    with --recompute-method block the first --recompute-num-layers of each pipeline stage, as Megatron."""
    t = cfg.training
    if t.recompute_granularity is None:
        return set()
    # Without a pipeline the model is one stage, whatever '|' marks its pattern has.
    stages = (stage_blocks(cfg) if cfg.parallel.pipeline_model_parallel_size > 1
              else [list(range(len(block_kinds(cfg.model))))])
    keep = None if t.recompute_method == "uniform" else t.recompute_num_layers
    return {b for stage in stages for b in stage[:keep]}

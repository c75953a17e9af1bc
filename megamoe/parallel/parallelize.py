"""Apply tensor and expert parallelism to a model from outside (torchtitan's `parallelize_*` pattern).

Every rank builds the same model from the same seed, block by block, and keeps its shard of each block as
soon as it is built, so every layout computes the same function:
- Mamba mixer: in_proj column-parallel with x and z each split by channel; conv1d, dt_proj, A_log, D on the
  local channels; x_proj row-parallel (its (dt, B, C) output all-reduced, and so is their gradient, since
  every rank's channels use them); out_proj row-parallel. The scan needs no communication.
- Attention by heads (qkv column, out row); dense FFN column then row.
- Switch MoE: router replicated; experts split over EP (all-to-all dispatch) and their width over ETP.
- Vocab-parallel embedding, LM head (tied to the embedding shard or its own) and cross entropy.
Linears are megatron-core's tensor-parallel layers, or Transformer Engine's when it is in use (te.py).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from megamoe.config import Config
from megamoe.model import Block, MambaLM, MambaMixer
from megamoe.parallel.expert_parallel import parallelize_moe
from megamoe.parallel.sharding import ShardSpec, set_shard_spec, take_shard
from megamoe.parallel.te import FastPaths, fast_paths, fused_norm, te_linear
from megamoe.parallel.tensor_parallel import (ColumnParallel, RowParallel, VocabParallelEmbedding, copy_to_tp,
                                              vocab_parallel_cross_entropy)


def _shard_param(param: nn.Parameter, dim: int, topo) -> nn.Parameter:
    spec = ShardSpec(tuple(param.shape), dim)
    return set_shard_spec(nn.Parameter(take_shard(param.detach(), spec, topo.tp_rank, topo.tp).clone()), spec)


def _parallel_linear(linear: nn.Linear, topo, paths: FastPaths, mode: str, partitions: Optional[list] = None):
    """This rank's `mode` ("column" / "row") shard of `linear`: TE's layer, megatron-core's, or `linear` itself."""
    if paths.te is not None:
        return te_linear(linear, topo, paths.te, mode, tuple(partitions or ()))
    if topo.tp == 1:
        return linear
    return (ColumnParallel if mode == "column" else RowParallel)(linear, topo, partitions)


def parallelize_mamba(mixer: MambaMixer, topo, paths: FastPaths) -> None:
    if topo.tp > 1:
        assert not mixer.moe_projections, "config validation rejects MoE projections with TP > 1"
    d_inner = mixer.d_inner
    if hasattr(mixer, "in_proj"):
        mixer.in_proj = _parallel_linear(mixer.in_proj, topo, paths, "column", [d_inner, d_inner])
    if isinstance(mixer.out_proj, nn.Linear):
        mixer.out_proj = _parallel_linear(mixer.out_proj, topo, paths, "row")
    if topo.tp == 1:
        return
    conv = mixer.conv1d
    local = d_inner // topo.tp
    mixer.conv1d = nn.Conv1d(local, local, conv.kernel_size[0], groups=local, padding=conv.padding[0],
                             bias=conv.bias is not None)
    mixer.conv1d.weight = _shard_param(conv.weight, 0, topo)
    if conv.bias is not None:
        mixer.conv1d.bias = _shard_param(conv.bias, 0, topo)
    # x_proj reads this rank's channels: row-parallel. Its (dt, B, C) output is then used whole by every rank,
    # so its gradient is all-reduced too (copy_to_tp on the output).
    mixer.x_proj = RowParallel(mixer.x_proj, topo)
    mixer.x_proj.register_forward_hook(lambda module, args, out: copy_to_tp(out, topo.tp_group))
    # dt_proj only lends its weight and bias (the bias is added inside the scan): plain local shards.
    dt_proj = nn.Linear(mixer.dt_rank, local)
    dt_proj.weight, dt_proj.bias = _shard_param(mixer.dt_proj.weight, 0, topo), _shard_param(mixer.dt_proj.bias, 0, topo)
    mixer.dt_proj = dt_proj
    mixer.A_log = _shard_param(mixer.A_log, 0, topo)
    mixer.D = _shard_param(mixer.D, 0, topo)


def parallelize_block(block: Block, topo, paths: FastPaths) -> Block:
    """Shard one block in place for `topo`; returns it."""
    if hasattr(block, "mixer"):
        parallelize_mamba(block.mixer, topo, paths)
        for name in ("conv_proj", "gate_proj", "out_proj"):
            moe = getattr(block.mixer, name, None)
            if moe is not None and hasattr(moe, "router"):
                parallelize_moe(moe, topo)
    if hasattr(block, "moe"):
        parallelize_moe(block.moe, topo)
    if hasattr(block, "attention"):
        d = block.attention.out_proj.weight.shape[0]
        block.attention.qkv = _parallel_linear(block.attention.qkv, topo, paths, "column", [d, d, d])
        block.attention.out_proj = _parallel_linear(block.attention.out_proj, topo, paths, "row")
    if hasattr(block, "ffn"):
        width = block.ffn.fc2.weight.shape[1]
        swiglu = block.ffn.activation == "swiglu"
        block.ffn.fc1 = _parallel_linear(block.ffn.fc1, topo, paths, "column", [width, width] if swiglu else None)
        block.ffn.fc2 = _parallel_linear(block.ffn.fc2, topo, paths, "row")
    if paths.apex_norms is not None:
        block.norm = fused_norm(block.norm, paths.apex_norms)
    return block


class _TiedVocabParallelHead(nn.Module):
    """LM head that reuses the vocab-parallel embedding's shard: logits of this rank's vocabulary rows."""

    def __init__(self, embedding: VocabParallelEmbedding, topo):
        super().__init__()
        self.embedding = [embedding]  # a list, so the shared weight is not registered twice
        self.tp_group = topo.tp_group

    @property
    def weight(self):
        return self.embedding[0].weight

    def forward(self, h):
        return F.linear(copy_to_tp(h, self.tp_group), self.weight)


def parallelize_embeddings(model: MambaLM, topo, paths: FastPaths) -> None:
    if paths.apex_norms is not None and model.post_process:
        model.norm_f = fused_norm(model.norm_f, paths.apex_norms)
    if topo.tp == 1:
        return
    tied = model.pre_process and model.post_process and model.lm_head.weight is model.embedding.weight
    if model.pre_process:
        model.embedding = VocabParallelEmbedding(model.embedding, topo)
    if model.post_process:
        model.lm_head = _TiedVocabParallelHead(model.embedding, topo) if tied else ColumnParallel(model.lm_head, topo)
        model.cross_entropy = vocab_parallel_cross_entropy


def build_parallel_model(cfg: Config, topo, paths: Optional[FastPaths] = None) -> MambaLM:
    """This rank's shard of the model (of its pipeline stages under PP), on topo.device."""
    from megamoe.parallel.pipeline import mark_shared_embedding_copy, stage_model_args
    paths = paths or fast_paths(cfg, topo.device)
    stage = stage_model_args(cfg, topo) if topo.pp > 1 else {}
    model = MambaLM(cfg.model, seed=cfg.training.seed, block_hook=lambda b: parallelize_block(b, topo, paths),
                    **stage)
    parallelize_embeddings(model, topo, paths)
    mark_shared_embedding_copy(model, topo)
    return model.to(topo.device)

"""Apply tensor and expert parallelism to a model from outside (torchtitan's `parallelize_*` pattern).

Every rank builds the same model from the same seed, block by block, and keeps its shard of each block as
soon as it is built, so every layout computes the same function:
- Mamba mixer: in_proj column-parallel with x and z each split by channel; conv1d, dt_proj, A_log, D on the
  local channels; x_proj row-parallel (its (dt, B, C) output all-reduced, and so is their gradient, since
  every rank's channels use them); out_proj row-parallel. The scan needs no communication.
- Attention by heads (qkv column, out row); dense FFN column then row.
- Switch MoE: router replicated; experts split over EP (all-to-all dispatch) and their width over ETP.
- Vocab-parallel embedding, LM head (tied to the embedding shard or its own) and cross entropy.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from megamoe.config import Config
from megamoe.model import Block, MambaLM, MambaMixer
from megamoe.parallel.expert_parallel import parallelize_moe
from megamoe.parallel.sharding import ShardSpec, set_shard_spec, take_shard
from megamoe.parallel.tensor_parallel import (ColumnParallel, RowParallel, VocabParallelEmbedding, copy_to_tp,
                                              vocab_parallel_cross_entropy)


def _shard_param(param: nn.Parameter, dim: int, topo) -> nn.Parameter:
    spec = ShardSpec(tuple(param.shape), dim)
    return set_shard_spec(nn.Parameter(take_shard(param.detach(), spec, topo.tp_rank, topo.tp).clone()), spec)


class _ReplicatedRowParallel(RowParallel):
    """Row-parallel linear whose output every rank then uses whole: all-reduce forward and backward."""

    def forward(self, x):
        return copy_to_tp(super().forward(x), self.tp_group)


def parallelize_mamba(mixer: MambaMixer, topo) -> None:
    if topo.tp == 1:
        return
    assert not mixer.moe_projections, "config validation rejects MoE projections with TP > 1"
    d_inner = mixer.d_inner
    mixer.in_proj = ColumnParallel(mixer.in_proj, topo, partitions=[d_inner, d_inner])
    conv = mixer.conv1d
    local = d_inner // topo.tp
    mixer.conv1d = nn.Conv1d(local, local, conv.kernel_size[0], groups=local, padding=conv.padding[0],
                             bias=conv.bias is not None)
    mixer.conv1d.weight = _shard_param(conv.weight, 0, topo)
    if conv.bias is not None:
        mixer.conv1d.bias = _shard_param(conv.bias, 0, topo)
    mixer.x_proj = _ReplicatedRowParallel(mixer.x_proj, topo)
    mixer.dt_proj = ColumnParallel(mixer.dt_proj, topo)
    mixer.A_log = _shard_param(mixer.A_log, 0, topo)
    mixer.D = _shard_param(mixer.D, 0, topo)
    mixer.out_proj = RowParallel(mixer.out_proj, topo)


def parallelize_block(block: Block, topo) -> Block:
    """Shard one block in place for `topo`; returns it."""
    if hasattr(block, "mixer"):
        parallelize_mamba(block.mixer, topo)
        for name in ("conv_proj", "gate_proj", "out_proj"):
            moe = getattr(block.mixer, name, None)
            if moe is not None and hasattr(moe, "router"):
                parallelize_moe(moe, topo)
    if hasattr(block, "moe"):
        parallelize_moe(block.moe, topo)
    if topo.tp > 1 and hasattr(block, "attention"):
        d = block.attention.out_proj.weight.shape[0]
        block.attention.qkv = ColumnParallel(block.attention.qkv, topo, partitions=[d, d, d])
        block.attention.out_proj = RowParallel(block.attention.out_proj, topo)
    if topo.tp > 1 and hasattr(block, "ffn"):
        width = block.ffn.fc2.weight.shape[1]
        swiglu = block.ffn.activation == "swiglu"
        block.ffn.fc1 = ColumnParallel(block.ffn.fc1, topo, partitions=[width, width] if swiglu else None)
        block.ffn.fc2 = RowParallel(block.ffn.fc2, topo)
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


def parallelize_embeddings(model: MambaLM, topo) -> None:
    if topo.tp == 1:
        return
    tied = model.pre_process and model.post_process and model.lm_head.weight is model.embedding.weight
    if model.pre_process:
        model.embedding = VocabParallelEmbedding(model.embedding, topo)
    if model.post_process:
        model.lm_head = _TiedVocabParallelHead(model.embedding, topo) if tied else ColumnParallel(model.lm_head, topo)
        model.cross_entropy = vocab_parallel_cross_entropy


def build_parallel_model(cfg: Config, topo) -> MambaLM:
    """This rank's shard of the model (of its pipeline stages under PP), on topo.device."""
    from megamoe.parallel.pipeline import mark_shared_embedding_copy, stage_model_args
    stage = stage_model_args(cfg, topo) if topo.pp > 1 else {}
    model = MambaLM(cfg.model, seed=cfg.training.seed, block_hook=lambda b: parallelize_block(b, topo), **stage)
    parallelize_embeddings(model, topo)
    mark_shared_embedding_copy(model, topo)
    return model.to(topo.device)

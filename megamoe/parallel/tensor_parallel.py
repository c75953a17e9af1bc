"""Tensor-parallel layers made from a model's full layers: the shard of megatron-core's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding that this TP rank owns.

Every layout computes the same function because the full model is built first (same seed on every
rank) and each rank then keeps its slice of the very same weights. The wrappers return a plain tensor,
as nn.Linear does, so the model's forward needs no change.

`partitions` splits an output dimension into blocks that are each sharded on their own: the Mamba
in_proj produces [x | z], and TP rank r must own x's r-th slice and z's r-th slice, not a contiguous
slice of the concatenation.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig, tensor_parallel


def _mp_config(tp: int) -> ModelParallelConfig:
    # CPU initialisation: megatron-core's GPU path needs the CUDA RNG tracker; the weights are
    # overwritten with the full model's slice right after anyway.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False)


def shard_index(size: int, rank: int, world: int, partitions: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Indices of the rows this rank owns along a dimension of `size`, made of `partitions` blocks."""
    partitions = list(partitions or [size])
    assert sum(partitions) == size, f"partitions {partitions} do not add up to {size}"
    index, offset = [], 0
    for block in partitions:
        if block % world:
            raise ValueError(f"a block of {block} rows does not split over {world} tensor-parallel ranks")
        step = block // world
        index.append(torch.arange(offset + rank * step, offset + (rank + 1) * step))
        offset += block
    return torch.cat(index)


def _noop_init(_):
    return None


class ColumnParallel(nn.Module):
    """Output features sharded over TP; input replicated. Returns the local output shard."""

    def __init__(self, linear: nn.Linear, topo, partitions: Optional[Sequence[int]] = None,
                 gather_output: bool = False):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.inner = tensor_parallel.ColumnParallelLinear(
            in_features, out_features, config=_mp_config(topo.tp), init_method=_noop_init,
            bias=linear.bias is not None, gather_output=gather_output, tp_group=topo.tp_group)
        rows = shard_index(out_features, topo.tp_rank, topo.tp, partitions)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias[rows])
        if partitions and len(partitions) > 1 and gather_output:
            raise ValueError("gather_output with several partitions would interleave them; gather by hand")

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x):
        return self.inner(x)[0]


class RowParallel(nn.Module):
    """Input features sharded over TP (the previous layer's local output); output all-reduced."""

    def __init__(self, linear: nn.Linear, topo, partitions: Optional[Sequence[int]] = None):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.inner = tensor_parallel.RowParallelLinear(
            in_features, out_features, config=_mp_config(topo.tp), init_method=_noop_init,
            bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=topo.tp_group)
        cols = shard_index(in_features, topo.tp_rank, topo.tp, partitions)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight[:, cols])
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x):
        return self.inner(x)[0]


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows sharded over TP; lookups outside the shard give zeros, then an all-reduce."""

    def __init__(self, embedding: nn.Embedding, topo):
        super().__init__()
        vocab, dim = embedding.weight.shape
        self.inner = tensor_parallel.VocabParallelEmbedding(vocab, dim, init_method=_noop_init,
                                                            config=_mp_config(topo.tp), tp_group=topo.tp_group)
        rows = shard_index(vocab, topo.tp_rank, topo.tp)
        with torch.no_grad():
            self.inner.weight.copy_(embedding.weight[rows])

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, ids):
        return self.inner(ids)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy from vocab-sharded logits (batch, L, vocab / TP); megatron-core's."""
    return tensor_parallel.vocab_parallel_cross_entropy(local_logits.float(), labels)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward: enter a TP region with replicated input."""
    return tensor_parallel.copy_to_tensor_model_parallel_region(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward, identity backward: leave a TP region whose ranks hold partial sums."""
    return tensor_parallel.reduce_from_tensor_model_parallel_region(x)


class _GatherLastDim(torch.autograd.Function):
    # megatron-core's gather_from_tensor_model_parallel_region allocates on torch.cuda.current_device(),
    # so this device-agnostic one is ours: all-gather forward, keep this rank's slice backward.
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather of the last dimension over `group` forward, this rank's slice backward."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherLastDim.apply(x, group)

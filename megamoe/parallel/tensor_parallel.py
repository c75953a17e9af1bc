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

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn

from megamoe.parallel.comm import COUNTER, count_all_reduce
from megamoe.parallel.sharding import ShardSpec, set_shard_spec, take_shard


def _mp_config(tp: int) -> ModelParallelConfig:
    # CPU initialisation: megatron-core's GPU path needs the CUDA RNG tracker; the weights are
    # overwritten with the full model's slice right after anyway.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False)


def _noop_init(_):
    return None


def _count_grad_all_reduce(x: torch.Tensor, group) -> None:
    """Record the all-reduce that the backward will run on x's gradient (for bench/bench_comm.py)."""
    if x.requires_grad and torch.is_grad_enabled():
        x.register_hook(lambda grad: count_all_reduce(grad, group, "tp_all_reduce"))


def _copy_shard(dst: torch.Tensor, full: torch.Tensor, spec: ShardSpec, topo) -> None:
    with torch.no_grad():
        dst.copy_(take_shard(full.detach(), spec, topo.tp_rank, topo.tp))
    set_shard_spec(dst, spec)


# The wrappers subclass megatron-core's layers (not wrap them), so parameter names stay those of the plain
# model (`in_proj.weight`) in every layout, and checkpoints and tests can match them by name.
class ColumnParallel(tensor_parallel.ColumnParallelLinear):
    """Output features sharded over TP; input replicated. Returns the local output shard.

    With `sequence_parallel` the input arrives already gathered along the sequence (gather_sequence), whose
    backward sums the input gradient over TP, so the layer must not all-reduce it again."""

    def __init__(self, linear: nn.Linear, topo, partitions: Optional[Sequence[int]] = None,
                 sequence_parallel: bool = False):
        out_features, in_features = linear.weight.shape
        super().__init__(in_features, out_features, config=_mp_config(topo.tp), init_method=_noop_init,
                         bias=linear.bias is not None, gather_output=False, tp_group=topo.tp_group,
                         disable_grad_reduce=sequence_parallel)
        blocks = tuple(partitions or ())
        _copy_shard(self.weight, linear.weight, ShardSpec(tuple(linear.weight.shape), 0, blocks), topo)
        if linear.bias is not None:
            _copy_shard(self.bias, linear.bias, ShardSpec(tuple(linear.bias.shape), 0, blocks), topo)

    def forward(self, x):
        if not self.disable_grad_reduce:
            _count_grad_all_reduce(x, self.tp_group)
        return super().forward(x)[0]


class RowParallel(tensor_parallel.RowParallelLinear):
    """Input features sharded over TP (the previous layer's local output); output all-reduced.

    With `sequence_parallel` it returns this rank's partial sums instead (no bias): the caller reduce-scatters
    them along the sequence and adds the bias (see parallelize.py)."""

    def __init__(self, linear: nn.Linear, topo, partitions: Optional[Sequence[int]] = None,
                 sequence_parallel: bool = False):
        out_features, in_features = linear.weight.shape
        super().__init__(in_features, out_features, config=_mp_config(topo.tp), init_method=_noop_init,
                         bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False,
                         tp_group=topo.tp_group)
        self.partial_output = sequence_parallel
        _copy_shard(self.weight, linear.weight, ShardSpec(tuple(linear.weight.shape), 1, tuple(partitions or ())),
                    topo)
        if linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias)
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.partial_output:
            return F.linear(x, self.weight)
        out = super().forward(x)[0]
        count_all_reduce(out, self.tp_group, "tp_all_reduce")
        return out


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocabulary rows sharded over TP; lookups outside the shard give zeros, then an all-reduce."""

    def __init__(self, embedding: nn.Embedding, topo):
        vocab, dim = embedding.weight.shape
        super().__init__(vocab, dim, init_method=_noop_init, config=_mp_config(topo.tp), tp_group=topo.tp_group)
        _copy_shard(self.weight, embedding.weight, ShardSpec(tuple(embedding.weight.shape), 0), topo)

    def forward(self, ids):
        out = super().forward(ids)
        count_all_reduce(out, self.tp_group, "tp_all_reduce")
        return out


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross entropy from vocab-sharded logits (batch, L, vocab / TP); megatron-core's, which reduces
    over megatron-core's tensor-parallel group: the `tp_group` that Topology hands out."""
    loss = tensor_parallel.vocab_parallel_cross_entropy(local_logits.float(), labels)
    for _ in range(3):  # max logit, target logit, sum of exponentials: one float per token each
        count_all_reduce(loss, tp_group, "tp_all_reduce")
    return loss


def copy_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward: enter a TP region with replicated input."""
    _count_grad_all_reduce(x, group)
    return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)


def reduce_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce forward, identity backward: leave a TP region whose ranks hold partial sums."""
    out = tensor_parallel.reduce_from_tensor_model_parallel_region(x, group=group)
    count_all_reduce(out, group, "tp_all_reduce")
    return out


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


# Sequence parallelism: outside the TP regions (norms, residual adds) each TP rank holds 1/TP of the sequence.
# megatron-core's mappings for this assume sequence-first tensors and allocate on the current CUDA device;
# megamoe's activations are (batch, L, d), so these device-agnostic ones work along dim 1.
def _all_gather_seq(x: torch.Tensor, group, kind: str = "tp") -> torch.Tensor:
    world = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] * world,) + tuple(xt.shape[1:]))
    dist.all_gather_into_tensor(out, xt, group=group)
    COUNTER.add(f"{kind}_all_gather", out.numel() * out.element_size() * (world - 1) // world)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group, kind: str = "tp") -> torch.Tensor:
    world = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] // world,) + tuple(xt.shape[1:]))
    dist.reduce_scatter_tensor(out, xt, group=group)
    COUNTER.add(f"{kind}_reduce_scatter", xt.numel() * xt.element_size() * (world - 1) // world)
    return out.transpose(0, 1).contiguous()


def _own_chunk(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial, kind):
        ctx.group, ctx.grad_is_partial, ctx.kind = group, grad_is_partial, kind
        return _all_gather_seq(x, group, kind)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter_seq(grad, ctx.group, ctx.kind), None, None, None
        return _own_chunk(grad, ctx.group), None, None, None


class _ToSequenceShard(torch.autograd.Function):
    """Forward: this rank's 1/TP of the sequence, reduce-scattered from partial sums or cut from a replicated
    tensor; backward: the gradient all-gathered along the sequence either way."""

    @staticmethod
    def forward(ctx, x, group, reduce):
        ctx.group = group
        return _reduce_scatter_seq(x, group) if reduce else _own_chunk(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None, None


def gather_sequence(x: torch.Tensor, group, grad_is_partial: bool = True, kind: str = "tp") -> torch.Tensor:
    """(batch, L / TP, ...) -> (batch, L, ...). Backward: reduce-scatter when what follows is TP-partial (a
    column-parallel layer), this rank's slice when it is replicated (the Switch router and its experts).
    `kind` names the bytes in COUNTER (context parallelism gathers attention's keys with it too)."""
    return _GatherSequence.apply(x, group, grad_is_partial, kind)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """TP-partial (batch, L, ...) -> summed (batch, L / TP, ...); backward all-gathers."""
    return _ToSequenceShard.apply(x, group, True)


def scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated (batch, L, ...) -> this rank's (batch, L / TP, ...); backward all-gathers."""
    return _ToSequenceShard.apply(x, group, False)

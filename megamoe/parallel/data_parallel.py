"""Data-parallel gradient reduction and global-norm clipping that counts every parameter once.

Parameter attributes (set by the parallelize step, megatron-core's convention where one exists):
- `is_expert`: the parameter belongs to local experts; its gradient is reduced over the expert-DP
  group, not the DP group (other EP ranks hold other experts).
- `tensor_model_parallel`: the parameter is a shard along TP (megatron-core sets this); otherwise it is
  replicated across TP ranks and counted only on TP rank 0 in the norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megamoe.parallel.comm import count_all_reduce

BUCKET_BYTES = 32 * 1024 * 1024


def is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "is_expert", False))


def _buckets(tensors: list, bucket_bytes: int):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def allreduce_gradients(params, topo, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average gradients over the data-parallel replicas of the loss, in flat buckets.

    Each of the DP ranks computes the mean loss of its own micro-batches. A dense gradient is then the
    average over the DP group. An expert's gradient already sums what every rank of its EP group sent it,
    so it is summed over the expert-DP group (the other copies of that expert) and divided by the same DP
    size (megatron-core scales expert gradients the same way).

    A parameter that got no gradient on this rank (an expert no token reached) gets zeros, so every
    replica reduces the same buckets."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dense = [p.grad for p in params if not is_expert(p)]
    expert = [p.grad for p in params if is_expert(p)]
    for grads, group, size in ((dense, topo.dp_group, topo.dp), (expert, topo.edp_group, topo.edp)):
        if topo.dp == 1:
            return
        for bucket in _buckets(grads, bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            flat /= topo.dp
            if size > 1:
                dist.all_reduce(flat, group=group)
                count_all_reduce(flat, group, "dp_all_reduce")
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)


def _sum_squares(grads: list) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().cpu()


def global_grad_norm(params, topo) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across all ranks."""
    from megatron.core import parallel_state as ps

    def counted(p, tp_rank):
        if getattr(p, "shared_embedding_copy", False):  # the last pipeline stage's tied head
            return False
        return getattr(p, "tensor_model_parallel", False) or tp_rank == 0

    with_grad = [p for p in params if p.grad is not None]
    dense = [p.grad for p in with_grad if not is_expert(p) and counted(p, topo.tp_rank)]
    expert = [p.grad for p in with_grad if is_expert(p) and counted(p, topo.etp_rank)]
    dense_sq, expert_sq = _sum_squares(dense), _sum_squares(expert)
    if topo.world_size > 1:
        device = topo.device
        dense_sq, expert_sq = dense_sq.to(device), expert_sq.to(device)
        dist.all_reduce(dense_sq, group=ps.get_model_parallel_group())
        dist.all_reduce(expert_sq, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense_sq + expert_sq).sqrt())


def clip_gradients(params, max_norm: float, topo) -> float:
    """Scale gradients so the global norm is at most max_norm; returns the norm before clipping."""
    params = list(params)
    norm = global_grad_norm(params, topo)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm

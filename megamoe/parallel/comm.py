"""Differentiable collectives that run on gloo and NCCL alike, and count the bytes they move.

megatron-core's all-to-all and gather mappings allocate on `torch.cuda.current_device()`, so the
expert-parallel exchange is written here on `torch.distributed` directly. Every call adds to
`COUNTER` (bytes this rank sends, by kind), which bench/bench_comm.py reads.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes sent by this rank per collective kind since the last reset."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


COUNTER = CommCounter()


def _sent_bytes(t: torch.Tensor, splits: Optional[Sequence[int]], rank: int) -> int:
    """Bytes that leave this rank in an all-to-all: everything but the rows it keeps."""
    row = t[0].numel() * t.element_size() if t.shape[0] else 0
    kept = (splits[rank] if splits is not None else t.shape[0] // dist.get_world_size()) * row
    return t.numel() * t.element_size() - kept


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange per-destination counts (one int64 per rank), the first half of a variable all-to-all."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    COUNTER.add("ep_all_to_all", counts.numel() * counts.element_size())
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(output_splits),
                               input_split_sizes=list(input_splits), group=group)
        COUNTER.add("ep_all_to_all", _sent_bytes(x, input_splits, dist.get_rank(group)))
        return out

    @staticmethod
    def backward(ctx, grad):
        # The gradient travels back the way the rows came: the splits swap roles.
        return _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> torch.Tensor:
    """Rows of `x` in blocks `input_splits` go to ranks 0..n-1; returns the blocks received, by source rank."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def count_all_reduce(t: torch.Tensor, group, kind: str) -> None:
    """Record a ring all-reduce of `t` over `group`: each rank sends 2 (n-1)/n of the buffer."""
    n = dist.get_world_size(group)
    if n > 1:
        COUNTER.add(kind, 2 * (n - 1) * t.numel() * t.element_size() // n)

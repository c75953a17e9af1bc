"""Expert parallelism: experts split over the EP group, tokens exchanged with variable all-to-alls.

Flow (megatron-core's): the SwitchMoE routes and sorts its tokens by global expert; `AllToAllDispatcher`
sends each EP rank the tokens of its experts (counts first, then tokens), regroups what arrives by local
expert, and after the local experts ran sends the results back the same way. Expert tensor parallelism
(ETP) splits each expert's hidden width over the expert-TP group: column then row, as a dense FFN; with
expert-TP 1 under TP > 1, each TP rank routes a 1/TP share of the tokens instead (TPSplitDispatcher).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from megamoe.model import Experts
from megamoe.parallel.comm import COUNTER, all_to_all, all_to_all_counts
from megamoe.parallel.plan import shard_spec_for
from megamoe.parallel.sharding import set_shard_spec, take_shard
from megamoe.parallel.tensor_parallel import copy_to_tp, reduce_from_tp


class AllToAllDispatcher:
    """Send tokens to the EP rank that holds their expert; return the experts' outputs the same way."""

    def __init__(self, group, ep: int, num_local_experts: int):
        self.group, self.ep, self.num_local = group, ep, num_local_experts

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor):
        """x sorted by global expert, counts (E,) -> (tokens for the local experts sorted by local expert,
        their per-expert counts, ctx for combine)."""
        sent = counts.view(self.ep, self.num_local)
        received = all_to_all_counts(counts, self.group).view(self.ep, self.num_local)  # (source, local expert)
        input_splits = sent.sum(1).tolist()
        output_splits = received.sum(1).tolist()
        x = all_to_all(x, output_splits, input_splits, self.group)
        # Arrived grouped by source rank, then local expert; the experts want them by local expert.
        lengths = received.flatten().tolist()  # one host copy; the loop below indexes it
        starts = list(itertools.accumulate(lengths, initial=0))
        by_expert = [torch.arange(starts[s * self.num_local + e], starts[s * self.num_local + e + 1])
                     for e in range(self.num_local) for s in range(self.ep)]
        order = torch.cat(by_expert).to(x.device)  # never empty: every rank holds at least one expert
        return x[order], received.sum(0).tolist(), (order, input_splits, output_splits)

    def combine(self, y: torch.Tensor, ctx) -> torch.Tensor:
        order, input_splits, output_splits = ctx
        y = y[torch.argsort(order)]  # back to (source rank, local expert) order
        return all_to_all(y, input_splits, output_splits, self.group)


class ShardedExperts(Experts):
    """This rank's experts (EP) with this rank's slice of their hidden width (ETP), as the sharding plan splits
    `<prefix>.experts.w1` / `.w2`."""

    def __init__(self, full: Experts, topo, prefix: str = "moe"):
        nn.Module.__init__(self)
        self.activation, self.num_experts = full.activation, full.num_experts // topo.ep
        self.grouped_gemm = full.grouped_gemm
        self.first_expert = topo.ep_rank * self.num_experts
        self.etp_group = topo.etp_group if topo.etp > 1 else None
        for name in ("w1", "w2"):
            if not hasattr(full, name):
                continue
            spec = shard_spec_for(f"{prefix}.experts.{name}", getattr(full, name).shape, full.activation)
            if topo.etp > 1 and spec.dim is None:
                raise ValueError("linear experts (MoE inside Mamba) do not support expert tensor parallelism")
            local = take_shard(getattr(full, name).detach(), spec, topo.etp_rank, topo.etp, topo.ep_rank, topo.ep)
            param = nn.Parameter(local.clone())
            param.is_expert = True
            setattr(self, name, set_shard_spec(param, spec))

    def forward(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        if self.etp_group is None:
            return super().forward(x, counts)
        # Column-parallel w1 (gradient of x all-reduced), row-parallel w2 (output all-reduced).
        return reduce_from_tp(super().forward(copy_to_tp(x, self.etp_group), counts), self.etp_group)


def _all_gather_rows(y: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """Every rank's rows (rank r holds sizes[r] of them), concatenated in rank order."""
    width = max(sizes)
    padded = y.new_zeros((width,) + tuple(y.shape[1:]))
    padded[:y.shape[0]] = y
    out = y.new_empty((len(sizes) * width,) + tuple(y.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    COUNTER.add("tp_all_gather", out.numel() * out.element_size() * (len(sizes) - 1) // len(sizes))
    return torch.cat([out[r * width:r * width + n] for r, n in enumerate(sizes)])


def _own_rows(t: torch.Tensor, sizes: list, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


class _SplitRows(torch.autograd.Function):
    """This rank's rows of a replicated tensor; backward all-gathers every rank's row gradients."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _own_rows(x, sizes, dist.get_rank(group)).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts; backward keeps this rank's rows (the gradient of what follows is
    the same on every rank: weighting and combining run replicated)."""

    @staticmethod
    def forward(ctx, y, sizes, group):
        ctx.sizes, ctx.rank = sizes, dist.get_rank(group)
        return _all_gather_rows(y, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.sizes, ctx.rank).contiguous(), None, None


class TPSplitDispatcher:
    """Experts not split over TP (expert-TP 1) while the layer's tokens are replicated over TP: each TP rank
    sends only its 1/TP share of the routed assignments through `inner` (so every token reaches its expert
    once), and the experts' outputs are all-gathered over TP, so weighting and combining run replicated as
    they do without tensor parallelism (megatron-core splits tokens over TP the same way)."""

    def __init__(self, inner, group, tp: int, tp_rank: int):
        self.inner, self.group, self.tp, self.tp_rank = inner, group, tp, tp_rank

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor):
        """x: every assignment sorted by expert, counts (E,) -> this rank's share through `inner`."""
        n = x.shape[0]
        bounds = [n * r // self.tp for r in range(self.tp + 1)]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        start, end = bounds[self.tp_rank], bounds[self.tp_rank + 1]
        # Per-expert counts of rows [start, end) of the expert-sorted assignments.
        edges = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        mine = (edges[1:].clamp(start, end) - edges[:-1].clamp(start, end))
        # The input gradient of each rank's share is all-gathered back, so the layers below get it whole.
        local_x, local_counts, inner_ctx = self.inner.dispatch(_SplitRows.apply(x, sizes, self.group), mine)
        return local_x, local_counts, (inner_ctx, sizes)

    def combine(self, y: torch.Tensor, ctx) -> torch.Tensor:
        inner_ctx, sizes = ctx
        return _GatherRows.apply(self.inner.combine(y, inner_ctx), sizes, self.group)


def parallelize_moe(moe, topo, prefix: str = "moe") -> None:
    """Keep this rank's experts of the MoE at block-relative `prefix` and exchange tokens over the EP group; the
    router stays replicated."""
    moe.experts = ShardedExperts(moe.experts, topo, prefix)
    if topo.ep > 1:
        moe.dispatcher = AllToAllDispatcher(topo.ep_group, topo.ep, moe.experts.num_experts)
    if topo.tp > 1 and topo.etp == 1:
        moe.dispatcher = TPSplitDispatcher(moe.dispatcher, topo.tp_group, topo.tp, topo.tp_rank)

"""Expert parallelism: experts split over the EP group, tokens exchanged with variable all-to-alls.

Flow (megatron-core's): the SwitchMoE routes and sorts its tokens by global expert; `AllToAllDispatcher`
sends each EP rank the tokens of its experts (counts first, then tokens), regroups what arrives by local
expert, and after the local experts ran sends the results back the same way. Expert tensor parallelism
(ETP) splits each expert's hidden width over the expert-TP group: column then row, as a dense FFN.
"""
from __future__ import annotations

import torch
from torch import nn

from megamoe.model.moe import Experts
from megamoe.parallel.comm import all_to_all, all_to_all_counts
from megamoe.parallel.sharding import ShardSpec, set_shard_spec, take_shard
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
        lengths = received.flatten().tolist()
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).view(self.ep, self.num_local).tolist()
        by_expert = [torch.arange(starts[s][e], starts[s][e] + received[s, e].item())
                     for e in range(self.num_local) for s in range(self.ep)]
        order = torch.cat(by_expert).to(x.device) if by_expert else torch.zeros(0, dtype=torch.long)
        return x[order], received.sum(0).tolist(), (order, input_splits, output_splits)

    def combine(self, y: torch.Tensor, ctx) -> torch.Tensor:
        order, input_splits, output_splits = ctx
        y = y[torch.argsort(order)]  # back to (source rank, local expert) order
        return all_to_all(y, input_splits, output_splits, self.group)


class ShardedExperts(Experts):
    """This rank's experts (EP) with this rank's slice of their hidden width (ETP)."""

    def __init__(self, full: Experts, topo):
        nn.Module.__init__(self)
        self.activation, self.num_experts = full.activation, full.num_experts // topo.ep
        self.etp_group = topo.etp_group if topo.etp > 1 else None
        if self.activation == "linear" and topo.etp > 1:
            raise ValueError("linear experts (MoE inside Mamba) do not support expert tensor parallelism")
        hidden = full.w1.shape[-1]
        w1_spec = ShardSpec(tuple(full.w1.shape), 2 if topo.etp > 1 else None,
                            (hidden // 2, hidden // 2) if self.activation == "swiglu" else (), expert_dim=0)
        specs = {"w1": w1_spec}
        if hasattr(full, "w2"):
            specs["w2"] = ShardSpec(tuple(full.w2.shape), 1 if topo.etp > 1 else None, expert_dim=0)
        for name, spec in specs.items():
            local = take_shard(getattr(full, name).detach(), spec, topo.etp_rank, topo.etp, topo.ep_rank, topo.ep)
            param = nn.Parameter(local.clone())
            param.is_expert = True
            setattr(self, name, set_shard_spec(param, spec))

    def forward(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        if self.etp_group is None:
            return super().forward(x, counts)
        # Column-parallel w1 (gradient of x all-reduced), row-parallel w2 (output all-reduced).
        return reduce_from_tp(super().forward(copy_to_tp(x, self.etp_group), counts), self.etp_group)


def parallelize_moe(moe, topo) -> None:
    """Keep this rank's experts and exchange tokens over the EP group; the router stays replicated."""
    moe.experts = ShardedExperts(moe.experts, topo)
    if topo.ep > 1:
        moe.dispatcher = AllToAllDispatcher(topo.ep_group, topo.ep, moe.experts.num_experts)

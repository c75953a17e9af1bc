"""ZeRO-1 (`--use-distributed-optimizer`): optimizer state sharded over the data-parallel replicas.

Each parameter is owned by one rank of its gradient-reducing group (dense: DP x CP, experts: expert-DP),
assigned greedily by size so owners hold about equal state. Every rank still averages the full gradients
(so clipping sees the same norm everywhere); only the owner keeps Adam's moments and steps the parameter,
then broadcasts the new values to the other replicas, one flat bucket per owner. Whole parameters are owned
(as torch's ZeroRedundancyOptimizer does), so checkpoints store each moment as a plain shard of its
parameter and reload into any layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megamoe.parallel.comm import COUNTER


class ParamOwners:
    """Which rank of its replica group steps each parameter; `broadcast()` shares the updated values."""

    def __init__(self, params, topo):
        params = [p for p in params if p.requires_grad]
        self.groups = []  # (process group, size, {owner group rank: [params]})
        self.mine = set()
        for expert in (False, True):
            group, size, rank = ((topo.edp_group, topo.edp, topo.edp_rank) if expert else
                                 (topo.dp_cp_group, topo.dp * topo.cp, topo.dp_cp_rank) if topo.cp > 1 else
                                 (topo.dp_group, topo.dp, topo.dp_rank))
            members = [p for p in params if getattr(p, "is_expert", False) == expert]
            load, owned = [0] * size, {r: [] for r in range(size)}
            for p in sorted(members, key=lambda p: -p.numel()):  # stable: same order on every replica
                owner = load.index(min(load))
                load[owner] += p.numel()
                owned[owner].append(p)
            self.mine.update(id(p) for p in owned[rank])
            if size > 1:
                self.groups.append((group, size, owned))

    def owns(self, param: torch.Tensor) -> bool:
        return id(param) in self.mine

    @torch.no_grad()
    def broadcast(self) -> None:
        """Send each owner's freshly stepped parameters to the other replicas."""
        for group, size, owned in self.groups:
            for owner, params in owned.items():
                if not params:
                    continue
                flat = _flatten_dense_tensors([p.data for p in params])
                dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
                COUNTER.add("dp_param_broadcast", flat.numel() * flat.element_size() * (size - 1) // size)
                for p, value in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
                    p.data.copy_(value)

"""Assemble full (global) tensors from the shards every rank holds: for parity tests, exports and tools.

Each rank writes its regions (see sharding.ShardSpec) into a zero tensor of the global shape; one all-reduce
over the world sums them and a second counts how many ranks wrote each element, so replicas average out.
Simple and layout-agnostic; it moves whole tensors, so it is meant for checks and small exports, while
checkpoints go through torch.distributed.checkpoint.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.sharding import ShardSpec, shard_spec


def _ranks(p, topo) -> tuple:
    expert = getattr(p, "is_expert", False)
    return (topo.etp_rank if expert else topo.tp_rank, topo.etp if expert else topo.tp,
            topo.ep_rank if expert else 0, topo.ep if expert else 1)


def full_tensors(named: dict, topo, grads: bool = False) -> dict:
    """{name: parameter} of this rank (any pipeline stage) -> {name: full tensor} on every rank, on CPU.
    With grads=True, the parameters' gradients instead (zeros where a parameter has none)."""
    names = sorted(named)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, {n: (shard_spec(named[n]) or ShardSpec(tuple(named[n].shape)),
                                           str(named[n].dtype)) for n in names})
        specs = {}
        for d in every:
            specs.update(d)
        names = sorted(specs)
    else:
        specs = {n: (shard_spec(named[n]) or ShardSpec(tuple(named[n].shape)), str(named[n].dtype)) for n in names}
    out = {}
    for name in names:
        spec, _ = specs[name]
        total = torch.zeros(spec.global_shape, dtype=torch.float64, device=topo.device)
        count = torch.zeros(spec.global_shape, dtype=torch.float64, device=topo.device)
        p = named.get(name)
        if p is not None:
            local = p.grad if grads else p
            local = torch.zeros_like(p) if local is None else local
            for loc, glob, size in spec.regions(*_ranks(p, topo)):
                src = local.detach()[tuple(slice(o, o + s) for o, s in zip(loc, size))]
                dst = tuple(slice(o, o + s) for o, s in zip(glob, size))
                total[dst] += src.double()
                count[dst] += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        out[name] = (total / count.clamp(min=1)).float().cpu()
    return out

"""Where a local parameter shard sits in its global tensor: the one description that gradient reduction,
norm clipping, checkpoints and layout conversion all read.

`parallelize` sets `param.shard_spec` on every sharded parameter; a parameter without one is replicated
(its local tensor is the global tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ShardSpec:
    """global_shape: the full tensor. `dim` is split over the tensor-parallel group (the expert-TP group for
    experts) in `partitions` blocks that are each split on their own (in_proj's [x | z]); `expert_dim` is split
    over the expert-parallel group (experts)."""

    global_shape: tuple
    dim: Optional[int] = None
    partitions: tuple = ()
    expert_dim: Optional[int] = None

    def regions(self, tp_rank: int, tp: int, ep_rank: int = 0, ep: int = 1) -> list:
        """[(local_offsets, global_offsets, sizes)] of the boxes this rank holds, one per partition block."""
        ndim = len(self.global_shape)
        local_start, global_start, size = [0] * ndim, [0] * ndim, list(self.global_shape)
        if self.expert_dim is not None:
            size[self.expert_dim] //= ep
            global_start[self.expert_dim] = ep_rank * size[self.expert_dim]
        if self.dim is None or tp == 1:
            return [(tuple(local_start), tuple(global_start), tuple(size))]
        boxes, offset, local = [], 0, 0
        for block in self.partitions or (self.global_shape[self.dim],):
            step = block // tp
            box_local, box_global, box_size = list(local_start), list(global_start), list(size)
            box_local[self.dim], box_global[self.dim], box_size[self.dim] = local, offset + tp_rank * step, step
            boxes.append((tuple(box_local), tuple(box_global), tuple(box_size)))
            offset += block
            local += step
        return boxes


def set_shard_spec(param: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    param.shard_spec = spec
    # megatron-core's attribute: counted on every TP rank by the global norm.
    param.tensor_model_parallel = spec.dim is not None
    return param


def shard_spec(param: torch.Tensor) -> Optional[ShardSpec]:
    return getattr(param, "shard_spec", None)


def take_shard(full: torch.Tensor, spec: ShardSpec, tp_rank: int, tp: int, ep_rank: int = 0,
               ep: int = 1) -> torch.Tensor:
    """This rank's local tensor cut out of the full one."""
    boxes = spec.regions(tp_rank, tp, ep_rank, ep)
    pieces = [full[tuple(slice(g, g + s) for g, s in zip(glob, size))] for _, glob, size in boxes]
    return torch.cat(pieces, dim=spec.dim) if len(pieces) > 1 else pieces[0]

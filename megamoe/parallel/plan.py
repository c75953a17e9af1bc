"""The sharding plan: how every parameter (and persistent buffer) of the model splits over tensor and expert
parallelism, as one table.

parallelize.py reads it to shard a live model and checkpoint/convert.py to re-shard a checkpoint offline, so the
two cannot disagree; a new layer is one new row. Rows match block-relative names (`mixer.in_proj.weight` for
`layers.3.mixer.in_proj.weight`) or top-level ones (`embedding.weight`), with fnmatch patterns; the first
matching row wins.

    Split(dim)            `dim` split over TP (over expert-TP for experts); None: replicated
    Split(dim, blocks=n)  the dim holds n equal blocks, each split on its own (in_proj's [x | z], qkv's [q | k | v]);
                          "swiglu": 2 blocks under the swiglu activation ([gate | up]), else 1
    Split(..., expert=True)  dim 0 indexes experts and is split over EP
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Optional, Union

from megamoe.config import ModelConfig
from megamoe.parallel.sharding import ShardSpec


@dataclass(frozen=True)
class Split:
    dim: Optional[int] = None
    blocks: Union[int, str] = 1
    expert: bool = False


COLUMN, ROW, REPLICATED = Split(0), Split(1), Split()

PLAN = (
    ("embedding.weight", COLUMN),  # vocab-parallel rows
    ("lm_head.weight", COLUMN),
    # MoE inside the Mamba projections (TP 1 only): linear experts split over EP alone, routers (weights and
    # expert biases) and the dense fallback for dropped tokens replicated
    ("mixer.*_proj.experts.w1", Split(expert=True)),
    ("mixer.*_proj.router.*", REPLICATED),
    ("mixer.*_proj.fallback.weight", REPLICATED),
    # the shared expert of an E block: a dense FFN, column then row
    ("moe.shared.fc1.*", Split(0, "swiglu")),
    ("moe.shared.fc2.weight", ROW),
    ("*experts.w1", Split(2, "swiglu", expert=True)),  # column-parallel
    ("*experts.w2", Split(1, expert=True)),  # row-parallel
    # Mamba mixer: in_proj column-parallel by channel of x and of z; the scan's parameters on the local channels;
    # x_proj and out_proj row-parallel
    ("mixer.in_proj.*", Split(0, blocks=2)),
    ("mixer.conv1d.*", COLUMN),
    ("mixer.x_proj.weight", ROW),
    ("mixer.dt_proj.*", COLUMN),
    ("mixer.A_log", COLUMN),
    ("mixer.D", COLUMN),
    ("mixer.out_proj.weight", ROW),
    # attention by heads, dense FFN column then row
    ("attention.qkv.*", Split(0, blocks=3)),
    ("attention.out_proj.weight", ROW),
    ("ffn.fc1.*", Split(0, "swiglu")),
    ("ffn.fc2.weight", ROW),
    ("*", REPLICATED),  # norms, routers and their expert-bias buffers, row-parallel biases
)

_BLOCK = re.compile(r"^layers\.\d+\.")


def split_of(name: str) -> Split:
    """The plan's row for parameter `name` (global, or relative to its block)."""
    local = _BLOCK.sub("", name)
    return next(split for pattern, split in PLAN if fnmatch.fnmatchcase(local, pattern))


def shard_spec_for(name: str, shape: tuple, activation: str = "gelu") -> ShardSpec:
    """Where each rank's shard of parameter `name` (global shape `shape`) sits: the plan's row as a ShardSpec.
    `activation`: the feed-forward activation of the layer the parameter belongs to (swiglu splits its width in
    two blocks)."""
    split, shape = split_of(name), tuple(shape)
    blocks = split.blocks
    if blocks == "swiglu":
        blocks = 2 if activation == "swiglu" else 1
    partitions = (shape[split.dim] // blocks,) * blocks if split.dim is not None and blocks > 1 else ()
    return ShardSpec(shape, split.dim, partitions, expert_dim=0 if split.expert else None)


def layout_boxes(name: str, shape: tuple, model: ModelConfig, tp: int, ep: int, etp: int) -> list:
    """Every distinct box (global offsets, sizes) the ranks of a TP x EP (x ETP) layout hold of `name`."""
    spec = shard_spec_for(name, shape, model.expert_activation)
    expert = spec.expert_dim is not None
    boxes = []
    for tp_rank in range(etp if expert else tp):
        for ep_rank in range(ep if expert else 1):
            for _, glob, size in spec.regions(tp_rank, etp if expert else tp, ep_rank, ep if expert else 1):
                if (glob, size) not in boxes:
                    boxes.append((glob, size))
    return boxes

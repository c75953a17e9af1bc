"""The layer pattern: one string for the whole stack, as in megatron-core's hybrid models.

    M Mamba   E Switch MoE   A attention   F dense FFN   | an explicit pipeline-stage boundary

MoE-Mamba is "ME" x N, Mamba "MM...", Transformer-MoE "AE...", Transformer "AF...". With
`model.parallel_moe`, each "ME" pair is one Parallel MoE-Mamba block whose Mamba and MoE read the same
normed input. The grammar and the checks that need only the pattern (stage counts, '|' segments) live here,
below the model, so the config validates them before anything is built; the FLOPs-balanced split of blocks
into stages, which needs the model, is in megamoe/parallel/pipeline.py.
"""
from __future__ import annotations

import dataclasses

from megamoe.errors import ConfigError

LAYER_KINDS = {"M": "Mamba", "E": "Switch MoE", "A": "attention", "F": "dense FFN"}


def block_kinds(model) -> list:
    """The blocks of `model.pattern` (a ModelConfig), in order: "M", "E", "A", "F", or "ME" (Parallel MoE-Mamba)."""
    letters = model.pattern.replace("|", "")
    kinds, i = [], 0
    while i < len(letters):
        if model.parallel_moe and letters[i:i + 2] == "ME":
            kinds.append("ME")
            i += 2
        else:
            kinds.append(letters[i])
            i += 1
    return kinds


def check_letters(pattern: str) -> None:
    bad = sorted(set(pattern) - set(LAYER_KINDS) - {"|"})
    if not pattern or bad:
        raise ConfigError(f"model.pattern={pattern!r}: unknown layer letters {bad}; use only "
                          + ", ".join(f"{k} ({v})" for k, v in LAYER_KINDS.items()))


def marked_stages(model, pp: int, virtual: int) -> list:
    """Global block indices of each stage the pattern's '|' marks give; there must be PP x virtual of them."""
    segments, stages = model.pattern.split("|"), pp * virtual
    if len(segments) != stages:
        raise ConfigError(f"model.pattern has {len(segments)} '|'-separated stages but the pipeline has "
                          f"{stages} (PP {pp} x virtual {virtual}); give {stages - 1} '|' marks or none")
    sizes = [len(block_kinds(dataclasses.replace(model, pattern=s))) for s in segments]
    if 0 in sizes or sum(sizes) != len(block_kinds(model)):
        raise ConfigError(f"model.pattern {model.pattern!r}: every stage needs at least one layer, and a "
                          "'|' may not split a Parallel MoE-Mamba 'ME' pair")
    starts = [sum(sizes[:i]) for i in range(stages)]
    return [list(range(s, s + k)) for s, k in zip(starts, sizes)]


def check_stages(model, pp: int, virtual: int) -> None:
    """The pattern fits PP x virtual stages: its '|' marks give exactly that many, or it has enough blocks."""
    if "|" in model.pattern:
        marked_stages(model, pp, virtual)
        return
    n, stages = len(block_kinds(model)), pp * virtual
    if n < stages:
        raise ConfigError(f"model.pattern has {n} blocks, fewer than the {stages} pipeline stages")

"""Where a non-finite loss or gradient came from: the step run again with every module watched.

When a step's loss or gradient norm is not finite, the trainer runs the same micro-batches once more from the
same weights inside `NonFiniteProbe`: forward hooks record each module whose output holds a NaN or an infinity
(for the experts, which expert's tokens), and hooks on those outputs and on the parameters record the gradients
that do. The watch costs nothing when no step fails. Each rank's first record in time is gathered and the
earliest of them is reported: by micro-batch, forward before backward, then the layer (the lowest in
forward, the highest in backward, which runs the other way), then the innermost module (an expert-parallel rank's
`layers.3.moe.experts` before the `layers.3.moe` its tokens came back to).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megamoe.model import Experts

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Finding:
    phase: str  # "forward output" | "output gradient" | "parameter gradient"
    module: str  # parameter-name prefix: layers.3.moe.experts
    micro_batch: int
    rank: int
    expert: Optional[int] = None  # global expert index, for an MoE layer's experts

    def order(self) -> tuple:
        layer = _layer(self.module)
        forward = self.phase == "forward output"
        return (self.micro_batch, not forward, layer if forward else -layer, -self.module.count("."), self.rank)

    def describe(self) -> str:
        expert = f" (expert {self.expert})" if self.expert is not None else ""
        return f"{self.phase} of {self.module}{expert} in micro-batch {self.micro_batch} on rank {self.rank}"


def _layer(name: str) -> float:
    """Position of a module in the forward: the embedding first, the blocks by index, the head last."""
    m = _LAYER.search(name)
    if m:
        return float(m.group(1))
    return -1.0 if name.startswith("embedding") else float("inf")


def _nonfinite(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def _first_bad_expert(module: Experts, rows: torch.Tensor, counts) -> Optional[int]:
    """The global index of the first expert whose rows (tokens sorted by local expert) are not finite."""
    if rows.dim() == 0 or rows.shape[0] != sum(counts):
        return None
    for e, chunk in enumerate(rows.split(list(counts))):
        if _nonfinite(chunk):
            return module.first_expert + e
    return None


class NonFiniteProbe:
    """Within: records where outputs and gradients of `model`'s modules (names as in `named_modules`, the
    parameters' prefixes) first go non-finite. `roots` count micro-batches (one call each per micro-batch)."""

    def __init__(self, model: nn.Module, rank: int, roots: list):
        self.model, self.rank, self.roots = model, rank, roots
        self.found: list = []
        self._handles: list = []
        # micro-batches so far per root (pipeline chunks run theirs in the schedule's order), and each module's root
        self._calls = [-1] * len(roots)
        # a forward-only pass before the step's (global_aux_loss's routing pre-pass) counts its own micro-batches
        self._grad_mode = [None] * len(roots)
        self._root_of = {id(m): k for k, root in enumerate(roots) for m in root.modules()}

    def __enter__(self) -> "NonFiniteProbe":
        for k, root in enumerate(self.roots):
            self._handles.append(root.register_forward_pre_hook(self._counter(k)))
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._param_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _counter(self, k: int):
        def hook(module, args):
            if self._grad_mode[k] is not None and self._grad_mode[k] != torch.is_grad_enabled():
                self._calls[k] = -1
            self._grad_mode[k] = torch.is_grad_enabled()
            self._calls[k] += 1
        return hook

    def _micro(self, module) -> int:
        return self._calls[self._root_of.get(id(module), 0)]

    def _record(self, phase: str, name: str, micro: int, expert: Optional[int] = None) -> None:
        if not any(f.phase == phase and f.module == name for f in self.found):
            self.found.append(Finding(phase, name, max(micro, 0), self.rank, expert))

    def _forward_hook(self, name: str):
        def hook(module, args, out):
            micro = self._micro(module)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            counts = args[1] if isinstance(module, Experts) and len(args) > 1 else None
            for t in outs:
                if _nonfinite(t):
                    expert = _first_bad_expert(module, t, counts) if counts is not None else None
                    self._record("forward output", name, micro, expert)
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._grad_hook(name, micro, module, counts))
        return hook

    def _grad_hook(self, name: str, micro: int, module, counts):
        def hook(grad):
            if _nonfinite(grad):
                expert = _first_bad_expert(module, grad, counts) if counts is not None else None
                self._record("output gradient", name, micro, expert)
        return hook

    def _param_hook(self, name: str):
        module = name.rpartition(".")[0]

        def hook(grad):
            if _nonfinite(grad):  # the micro-batch is the latest one run (exact without a pipeline)
                self._record("parameter gradient", module, max(self._calls))
        return hook

    def first(self) -> Optional[Finding]:
        """This rank's first record in time (a module finishes before its parent, so the innermost comes first)."""
        return self.found[0] if self.found else None

"""The experts of a Switch MoE decode step (SwitchMoE.step): each token through its chosen experts' weights as
stored, weighted and summed, with none of the dispatch bookkeeping of forward().

    out[t] = sum_k weights[t, k] * E_{expert_index[t, k]}(x[t])

Which experts run is known only from the router's values. In a compiled decode step (inference/compiled.py) one
token's experts are read as scalars inside the graph (Dynamo's capture_scalar_outputs), so their products stay
the graph's own ops; several tokens' run as one opaque op, `megamoe::expert_mix`, of this same eager code.
"""
from __future__ import annotations

from typing import Optional

import torch

from megamoe.model.attention import activate
from megamoe.ops.linear import matmul_in_out


def expert_mix(x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
               w2: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """x (tokens, d_in); expert_index, weights (tokens, k); w1 (E, d_in, width), w2 (E, d_hidden, d_out) or None
    (linear experts), stored either way (ops.linear.store_out_in). Returns (tokens, d_out) in x's dtype."""
    if x.shape[0] == 1:
        return _one_token(x, expert_index, weights, w1, w2, activation)
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.expert_mix(x, expert_index, weights, w1, w2, activation)
    return _by_expert(x, expert_index, weights, w1, w2, activation)


def _ffn(x: torch.Tensor, e, w1: torch.Tensor, w2: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    y = matmul_in_out(x, w1[e])
    return y if w2 is None else matmul_in_out(activate(y, activation), w2[e])


def _one_token(x, expert_index, weights, w1, w2, activation):
    """Batch-1 decoding: the token's experts' outputs weighted and summed, no indexing."""
    if torch.compiler.is_compiling():  # unbacked scalars, checked in range so that w1[e] is a valid view
        chosen = [expert_index[0, k].item() for k in range(expert_index.shape[1])]
        for e in chosen:
            torch._check(e >= 0)
            torch._check(e < w1.shape[0])
    else:
        chosen = expert_index[0].tolist()
    out = None
    for k, e in enumerate(chosen):
        y = _ffn(x, e, w1, w2, activation) * weights[:, k:k + 1].to(x.dtype)
        out = y if out is None else out + y
    return out


def _by_expert(x, expert_index, weights, w1, w2, activation):
    """Several tokens: each expert's weights read once, for all the tokens that chose it."""
    out, by_expert = None, {}  # expert -> (tokens, their k)
    for t, chosen in enumerate(expert_index.tolist()):
        for k, e in enumerate(chosen):
            by_expert.setdefault(e, ([], []))[0].append(t)
            by_expert[e][1].append(k)
    for e, (tokens, ks) in by_expert.items():
        rows = torch.tensor(tokens, device=x.device)
        y = _ffn(x[rows], e, w1, w2, activation) * weights[rows, torch.tensor(ks, device=x.device), None].to(x.dtype)
        out = (y.new_zeros(x.shape[0], y.shape[-1]) if out is None else out).index_add_(0, rows, y)
    return out


_LIB = torch.library.Library("megamoe", "FRAGMENT")  # a plain library op, as ops.linear's
_LIB.define("expert_mix(Tensor x, Tensor expert_index, Tensor weights, Tensor w1, Tensor? w2, str activation) "
            "-> Tensor")
_LIB.impl("expert_mix", _by_expert, "CompositeExplicitAutograd")


@torch.library.register_fake("megamoe::expert_mix", lib=_LIB)
def _(x, expert_index, weights, w1, w2, activation):
    return x.new_empty(x.shape[0], (w1 if w2 is None else w2).shape[-1])

"""The MoE router and megatron-core's routing options: scores, token choice (top-k) or expert choice, the expert
bias of aux-loss-free balancing, the balancing losses. Plain PyTorch; docs/moe_routing.md says what each does.

    logits = router(x)                                    (tokens, E), float32 (Switch's selective precision)
    gates  = softmax(logits) | sigmoid(logits)            what the chosen experts are weighted by
    probs  = softmax(logits) | gates / gates.sum(-1)      what the losses and the router entropy read
    token choice:  experts = top-k(gates + bias)  (pre-softmax; else top-k(logits + bias), softmax over the chosen)
                   weights = the chosen gates, divided by their sum when renormalising
    expert choice: each expert takes the `capacity` tokens of highest gate (sees the whole micro-batch: not causal)

Balancing losses (x the aux-loss coefficient), f_i the fraction of assignments to expert i, P_i its mean prob:
    aux_loss         E * sum_i f_i P_i over the micro-batch (Switch)
    seq_aux_loss     the same within each sequence, averaged over sequences
    global_aux_loss  f_i counted over the whole global batch (handed in by the training step), P_i over the
                     micro-batch: the micro-batch terms then add up to the global batch's loss
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """How an MoE layer chooses experts: the model config's router_* keys (the defaults are Switch's)."""

    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = True  # gates over all experts, then top-k; False: top-k of the logits, then softmax
    renormalize: Optional[bool] = None  # None: Megatron's rule (sigmoid with top-k > 1)
    router_type: str = "token_choice"  # token_choice | expert_choice
    load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | global_aux_loss | none
    drop_policy: str = "position"  # position | probs
    force_load_balancing: bool = False  # deal tokens evenly, ignoring the router's choice

    def renormalizes(self, top_k: int) -> bool:
        if self.renormalize is not None:
            return self.renormalize
        return self.score_function == "sigmoid" and top_k > 1


class SwitchRouter(nn.Module):
    """Linear router computed in float32; with `expert_bias`, a per-expert bias buffer (not a parameter: the
    optimizer never sees it) that only the choice of experts reads."""

    def __init__(self, d_model: int, num_experts: int, expert_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update: an expert above the mean load moves down by `rate`, one below it up."""
        load = tokens_per_expert.to(torch.float64)
        step = torch.sign(load.mean() - load).to(self.expert_bias)
        self.expert_bias.add_(rate * step)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> int:
    """Tokens each expert may take; capacity_factor None or <= 0 means no limit."""
    if capacity_factor is None or capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def router_scores(logits: torch.Tensor, score_function: str) -> tuple:
    """(gates, probs), both (tokens, E): what the chosen experts are weighted by, and a distribution over the
    experts for the losses and the entropy (softmax: the same tensor; sigmoid: the gates normalised)."""
    if score_function == "sigmoid":
        gates = torch.sigmoid(logits)
        return gates, gates / (gates.sum(-1, keepdim=True) + 1e-20)
    probs = torch.softmax(logits, dim=-1)
    return probs, probs


def token_choice(logits: torch.Tensor, gates: torch.Tensor, top_k: int, routing: Routing,
                 bias: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None) -> tuple:
    """(expert_index, weights), each (tokens, k): the experts every token chooses and their gating weights.
    `bias` (E,) is added to what the choice reads, never to the weights. `token_ids` (tokens,): each token's
    index in its micro-batch, which forced balancing deals by (default: 0, 1, ...)."""
    tokens, num_experts = logits.shape
    post_softmax = routing.score_function == "softmax" and not routing.pre_softmax
    if routing.force_load_balancing:  # token t deals to experts t*k .. t*k + k - 1 (mod E): even to one token
        if token_ids is None:
            token_ids = torch.arange(tokens, device=logits.device)
        rows = token_ids[:, None] * top_k
        expert_index = (rows + torch.arange(top_k, device=logits.device)) % num_experts
    else:
        select = logits if post_softmax else gates
        expert_index = (select if bias is None else select + bias).topk(top_k, dim=-1).indices
    if post_softmax:
        weights = torch.softmax(logits.gather(1, expert_index), dim=-1)
    else:
        weights = gates.gather(1, expert_index)
    if routing.renormalizes(top_k):
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return expert_index, weights


def expert_choice(gates: torch.Tensor, expert_capacity: int) -> tuple:
    """Every expert takes its `expert_capacity` tokens of highest gate: (token_of, expert_of, weight_of) of the
    assignments, grouped by expert (Zhou et al., 2022). It reads the whole micro-batch, later tokens included."""
    tokens, num_experts = gates.shape
    weight, token = gates.t().topk(min(expert_capacity, tokens), dim=1)  # (E, capacity)
    expert = torch.arange(num_experts, device=gates.device)[:, None].expand_as(token)
    return token.reshape(-1), expert.reshape(-1), weight.reshape(-1)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                        counts: Optional[torch.Tensor] = None, tokens: Optional[int] = None) -> torch.Tensor:
    """Switch's N * sum_i f_i * P_i (unweighted). probs (tokens, E) fp32; expert_index (tokens, k). When `probs`
    are one slice of a micro-batch (context parallelism), `counts` (E,) and `tokens` are the whole micro-batch's:
    the slices' losses then add up to the whole's."""
    if counts is None:
        counts = torch.bincount(expert_index.flatten(), minlength=num_experts)
    counts = counts.to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    return num_experts * torch.sum(f * probs.sum(0)) / (tokens or probs.shape[0])


def sequence_load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                                 sequences: int, counts: Optional[torch.Tensor] = None,
                                 length: Optional[int] = None) -> torch.Tensor:
    """The Switch loss of each sequence on its own, averaged over the `sequences` (tokens in sequence order).
    One slice of each sequence (context parallelism): `counts` (sequences, E) and `length` are the whole ones'."""
    tokens, top_k = expert_index.shape
    local = tokens // sequences
    if counts is None:
        counts = F.one_hot(expert_index, num_experts).sum(1).view(sequences, local, num_experts).sum(1)
    length = length or local
    f = counts.to(probs.dtype) / (length * top_k)
    return num_experts * (f * probs.view(sequences, local, num_experts).sum(1) / length).sum(-1).mean()


def global_load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_experts: int,
                               tokens: Optional[int] = None) -> torch.Tensor:
    """N * sum_i f_i * P_i with f_i from `counts` (E,): the assignments of a whole global batch; P_i over the
    micro-batch (of `tokens`, when `probs` are one slice of it)."""
    counts = counts.to(probs.device, probs.dtype)
    return num_experts * torch.sum(counts / counts.sum().clamp(min=1) * probs.sum(0)) / (tokens or probs.shape[0])


def entropy_sum(probs: torch.Tensor) -> torch.Tensor:
    """The router entropy -sum_i p_i log p_i of every token, summed (nats)."""
    return -(probs * probs.clamp(min=1e-20).log()).sum()

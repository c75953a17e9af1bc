"""Switch Mixture-of-Experts (Fedus et al., 2021): fp32 router, top-1 (top-k option), capacity, dropping.

    probs = softmax(router(x))  (float32)        expert_i = top-k of probs
    out   = sum_k probs[expert_k] * E_{expert_k}(x)  for the tokens within their expert's capacity; 0 otherwise
            (a dropped token keeps only its residual)
    load-balancing loss = weight * N_experts * sum_i f_i * P_i   (f_i: fraction of assignments to i, P_i: mean prob)
    router z-loss       = weight * mean(logsumexp(logits)^2)

Capacity is counted over one micro-batch of one data-parallel rank (as Switch counts per device), in token
order: the first `capacity` tokens routed to an expert are kept. Under context parallelism a call sees one
slice of every row; `sequence` (WholeSequence here) then counts the other slices' tokens too, so capacity, the
losses and the routing totals are the whole micro-batch's.
megatron-core's routing options (top-k, sigmoid scores, the expert bias, expert choice, per-sequence and
global-batch losses, dropping by probability, shared experts) are `Routing` and router.py's; a dropped token of
an MoE projection gets 0 there, or with `dense_fallback` a dense projection of the same shape.

The flow is megatron-core's: route -> permute (sort by expert) -> dispatcher.exchange -> experts ->
dispatcher.exchange back -> unpermute and weight. `LocalDispatcher` keeps every expert here; expert
parallelism swaps in an all-to-all dispatcher from megamoe.parallel, the model code stays the same.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.attention import FeedForward, activate
from megamoe.model.moe_step import expert_mix
from megamoe.model.router import (
    Routing,
    SwitchRouter,
    capacity,
    entropy_sum,
    expert_choice,
    global_load_balancing_loss,
    load_balancing_loss,
    router_scores,
    sequence_load_balancing_loss,
    token_choice,
)
from megamoe.ops.linear import linear


class _AuxLossInjector(torch.autograd.Function):
    """Identity on the activations; in backward hands the auxiliary loss the gradient `scale`.

    The aux loss then trains the router through the activations it was computed beside, so it never has to
    be added to the LM loss, or sent between pipeline stages (megatron-core's MoEAuxLossAutoScaler).
    """

    scale = 1.0

    @staticmethod
    def forward(ctx, hidden, aux):
        ctx.save_for_backward(aux)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, _AuxLossInjector.scale)


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """`hidden`, carrying `aux` into the backward with the gradient set by `aux_loss_scale` (1 outside it)."""
    if not (torch.is_grad_enabled() and aux.requires_grad):
        return hidden
    return _AuxLossInjector.apply(hidden, aux)


@contextlib.contextmanager
def aux_loss_scale(scale: float):
    """Within: every attached aux loss gets gradient `scale` in backward. Set it to what the LM loss is scaled
    by (1 / micro-batches of a step); the backward must run inside. Restored on exit."""
    previous = _AuxLossInjector.scale
    _AuxLossInjector.scale = float(scale)
    try:
        yield
    finally:
        _AuxLossInjector.scale = previous


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM (F.grouped_mm, torch >= 2.9) runs here: CUDA bf16 on sm80 and newer, or CPU fp32 /
    bf16 (where it measured 0.95x to 1.2x the per-expert loop's speed: bench/bench_experts.py)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm whose backward gets a contiguous gradient: its kernels need 16-byte aligned strides, and an
    expanded gradient (e.g. of `.sum()`) has stride 0."""
    out = F.grouped_mm(x.contiguous(), w, offs=offs)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


class Experts(nn.Module):
    """`num_experts` feed-forward experts stored as batched weights (experts, in, out), no biases.

    activation "gelu"/"relu": w2(act(w1 x)); "swiglu": w2(silu(w1_gate x) * w1_up x) with w1 = [gate | up];
    "linear": w1 x alone (the experts that replace a Mamba projection).
    """

    def __init__(self, num_experts: int, d_in: int, d_hidden: int, d_out: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.num_experts = num_experts
        if activation == "linear":
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, d_out))
        else:
            width = 2 * d_hidden if activation == "swiglu" else d_hidden
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, width))
            self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_out))
        self.grouped_gemm = True  # torch's grouped GEMM where it fits (grouped_fits); False: always the loop
        self.first_expert = 0  # the global index of local expert 0 (expert parallelism holds a slice)
        # nn.Linear's default init, per expert: uniform(+-1/sqrt(fan_in)).
        for w in self.parameters():
            nn.init.uniform_(w, -w.shape[1] ** -0.5, w.shape[1] ** -0.5)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e applied to x (the reference the batched paths are tested against)."""
        return self._ffn(x, self.w1[e], self.w2[e] if hasattr(self, "w2") else None)

    def _ffn(self, x: torch.Tensor, w1: torch.Tensor, w2: Optional[torch.Tensor]) -> torch.Tensor:
        h = x @ w1
        return h if w2 is None else activate(h, self.activation) @ w2

    def forward(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        """x: tokens sorted by local expert, `counts[e]` of them for expert e."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if x.shape[0] == 0:
            # No token reached these experts. The empty output stays connected to x, so that under expert
            # parallelism the backward still runs this rank's side of the all-to-all the other ranks wait on;
            # and it has the other ranks' dtype (the autocast one), which the all-to-all's buffers take.
            return (x.new_zeros(0, self.output_size) + 0 * x.sum()).to(dtype)
        if self.grouped_gemm and self.grouped_fits(x.device, dtype, x.shape[-1]):
            return self._grouped(x.to(dtype), counts)
        # unbind: one backward node for all experts (indexing w1[e] would add a full-size gradient per expert).
        w1 = self.w1.unbind(0)
        w2 = self.w2.unbind(0) if hasattr(self, "w2") else [None] * len(w1)
        return torch.cat([self._ffn(chunk, w1[e], w2[e]) for e, chunk in enumerate(x.split(counts))
                          if chunk.shape[0]])

    def _grouped(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        """Every local expert in one grouped GEMM per weight (torch's grouped_mm; CUTLASS kernels on CUDA).
        Experts without tokens are left out of the call: on Blackwell (sm100) grouped_mm's backward writes
        non-zero weight gradients for empty groups (pytorch#172439); their gradient is then exactly zero."""
        weights = [self.w1] + ([self.w2] if hasattr(self, "w2") else [])
        if 0 in counts:
            busy = [e for e, c in enumerate(counts) if c]
            index = torch.tensor(busy, device=x.device)
            weights, counts = [w.index_select(0, index) for w in weights], [counts[e] for e in busy]
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x.device)
        h = _grouped_mm(x, weights[0].to(x.dtype), offs)
        if self.activation == "linear":
            return h
        return _grouped_mm(activate(h, self.activation).to(x.dtype), weights[1].to(x.dtype), offs)

    def grouped_fits(self, device: torch.device, dtype: torch.dtype, d_in: int) -> bool:
        """Whether grouped_mm runs here: a supported device and dtype, and rows 16-byte aligned as its kernels
        need (every width a multiple of 8 in bf16, of 4 in fp32)."""
        widths = [d_in, self.w1.shape[-1]] + (list(self.w2.shape[1:]) if hasattr(self, "w2") else [])
        size = torch.finfo(dtype).bits // 8
        return grouped_gemm_supported(device, dtype) and all(w * size % 16 == 0 for w in widths)

    @property
    def output_size(self) -> int:
        return (self.w1 if self.activation == "linear" else self.w2).shape[-1]


class LocalDispatcher:
    """All experts live here: nothing to exchange."""

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor):
        """x sorted by global expert, counts (E,) -> (tokens for local experts, their per-expert counts, ctx)."""
        return x, counts.tolist(), None

    def combine(self, y: torch.Tensor, ctx) -> torch.Tensor:
        return y


class WholeSequence:
    """The tokens of one call are the whole micro-batch. Context parallelism swaps in its slices of it
    (megamoe.parallel.context_parallel): `slices` of them, this one at `index`."""

    slices, index = 1, 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(slices, *t.shape): every slice's t."""
        return t[None]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the slices (no gradient)."""
        return t

    def token_ids(self, rows: int, tokens: int, device) -> torch.Tensor:
        """(tokens,) each of this call's tokens' index in the whole micro-batch (rows x L, row-major)."""
        length = tokens // rows
        whole = length * self.slices
        local = torch.arange(length, device=device) + self.index * length
        return (torch.arange(rows, device=device)[:, None] * whole + local).reshape(-1)


@dataclass
class RoutingStats:
    tokens_per_expert: torch.Tensor  # (E,) assignments before dropping
    dropped: int  # assignments over capacity (expert choice: tokens no expert took)
    assignments: int  # (expert choice: tokens)
    entropy: torch.Tensor  # the router entropy summed over tokens
    tokens: int

    def row(self) -> torch.Tensor:
        """tokens per expert, dropped, assignments, entropy sum, tokens: one float64 row (MoE totals)."""
        rest = torch.tensor([self.dropped, self.assignments, float(self.entropy), self.tokens], dtype=torch.float64)
        return torch.cat([self.tokens_per_expert.detach().double().cpu(), rest])


@dataclass
class Assignments:
    """One call's routing: the kept assignments (token, expert, weight), and what was decided before dropping."""

    token_of: torch.Tensor
    expert_of: torch.Tensor
    weight_of: torch.Tensor
    expert_index: Optional[torch.Tensor]  # (tokens, k) of token choice; None under expert choice
    tokens_per_expert: torch.Tensor  # (E,) before dropping
    dropped: int
    assignments: int
    unserved: torch.Tensor  # (tokens,) bool: no expert kept the token
    every: Optional[torch.Tensor] = None  # (slices, k, rows, E) of token choice: see SwitchMoE.keep_mask


@contextlib.contextmanager
def moe_capacity(model: nn.Module, capacity_factor: Optional[float]):
    """Run every Switch MoE of `model` (E blocks and MoE projections) with this capacity_factor (0: no limit);
    None leaves them as configured. Restored on exit."""
    moes = [m for m in model.modules() if isinstance(m, SwitchMoE)] if capacity_factor is not None else []
    saved = [m.capacity_factor for m in moes]
    for m in moes:
        m.capacity_factor = capacity_factor
    try:
        yield
    finally:
        for m, c in zip(moes, saved):
            m.capacity_factor = c


class SwitchMoE(nn.Module):
    """Switch MoE layer; (batch, L, d_in) -> (batch, L, d_out). Sets `last_aux_loss`, `last_z_loss`, `last_stats`.

    routing: how experts are chosen (Routing; Switch's by default). expert_bias: a bias buffer for aux-loss-free
    balancing (SwitchRouter). shared_expert_size: a dense expert of that width beside the routed ones, every token
    through it. dense_fallback: tokens none of whose experts kept them get a dense linear d_in -> d_out.
    `global_counts` (E,), when the training step sets it, are the global batch's assignments for global_aux_loss.
    """

    def __init__(self, d_model: int, num_experts: int, d_expert: int, top_k: int = 1,
                 capacity_factor: Optional[float] = 1.0, load_balancing_weight: float = 0.01,
                 z_loss_weight: float = 0.0, activation: str = "gelu", d_out: Optional[int] = None,
                 routing: Optional[Routing] = None, expert_bias: bool = False,
                 shared_expert_size: Optional[int] = None, dense_fallback: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        self.routing = routing or Routing()
        self.router = SwitchRouter(d_model, num_experts, expert_bias)
        self.experts = Experts(num_experts, d_model, d_expert, d_out or d_model, activation)
        if shared_expert_size:
            self.shared = FeedForward(d_model, shared_expert_size, activation)
        if dense_fallback:
            self.fallback = nn.Linear(d_model, d_out or d_model, bias=False)
        self.dispatcher = LocalDispatcher()
        self.sequence = WholeSequence()
        self.layer_name = ""  # its place in the model, e.g. layers.1.moe (set by MambaLM)
        self.global_counts: Optional[torch.Tensor] = None
        self.last_aux_loss = self.last_z_loss = None
        self.last_stats: Optional[RoutingStats] = None

    def _aux_loss(self, probs: torch.Tensor, expert_index: torch.Tensor, every: torch.Tensor) -> Optional[torch.Tensor]:
        """This call's share of the balancing loss; `every` (slices, k, rows, E): the assignment counts of every
        slice of the micro-batch's rows (one slice without context parallelism)."""
        kind, weight = self.routing.load_balancing_type, self.load_balancing_weight
        if kind == "none":
            return None
        tokens = probs.shape[0] * self.sequence.slices
        if kind == "seq_aux_loss":
            rows = every.shape[2]
            return weight * sequence_load_balancing_loss(probs, expert_index, self.num_experts, rows,
                                                         every.sum((0, 1)), tokens // rows)
        if kind == "global_aux_loss" and self.global_counts is not None and self.training:
            return weight * global_load_balancing_loss(probs, self.global_counts, self.num_experts, tokens)
        return weight * load_balancing_loss(probs, expert_index, self.num_experts, every.sum((0, 1, 2)), tokens)

    def _z_loss(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.z_loss_weight:
            return None
        tokens = logits.shape[0] * self.sequence.slices
        return self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).sum() / tokens

    def keep_mask(self, expert_index: torch.Tensor, weights: Optional[torch.Tensor] = None, rows: int = 1):
        """(tokens, k) bool: within capacity; and `every` (slices, k, rows, E), the assignments of every slice's
        rows (the queue in front of this slice), and the capacity. position: first choices of all tokens, then
        second choices..., in token order (rows x L, row-major; under context parallelism each row's slices in
        rank order); probs: each expert keeps its highest-weighted assignments (ties in that same order; one
        slice only)."""
        tokens, k = expert_index.shape
        one_hot = F.one_hot(expert_index.t().reshape(k, rows, tokens // rows), self.num_experts)  # (k, rows, L, E)
        every = self.sequence.gather(one_hot.sum(2))  # (slices, k, rows, E)
        cap = capacity(tokens * self.sequence.slices, self.num_experts, k, self.capacity_factor)
        flat = expert_index.t().reshape(-1)  # choice-major order
        if self.routing.drop_policy == "probs" and weights is not None and cap < flat.numel():
            order = torch.argsort(-weights.detach().t().reshape(-1), stable=True)
            order = order[torch.argsort(flat[order], stable=True)]  # by expert, each by weight
            per_expert = torch.bincount(flat, minlength=self.num_experts)
            starts = torch.cumsum(per_expert, 0) - per_expert
            rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
            keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, order, rank < cap)
            return keep.reshape(k, tokens).t(), every, cap
        queue = every.permute(1, 2, 0, 3).flatten(0, 2)  # (k, rows, slice) order
        before = (queue.cumsum(0) - queue).view(k, rows, -1, self.num_experts)[:, :, self.sequence.index]
        position = ((before[:, :, None] + one_hot.cumsum(2)) * one_hot).sum(-1) - 1  # in its expert's queue
        return (position < cap).reshape(k, tokens).t(), every, cap

    def _assignments(self, logits: torch.Tensor, gates: torch.Tensor, rows: int) -> "Assignments":
        tokens = logits.shape[0]
        if self.routing.router_type == "expert_choice" and self.training:  # one slice only (config refuses CP)
            cap = capacity(tokens, self.num_experts, self.top_k, self.capacity_factor)
            token_of, expert_of, weight_of = expert_choice(gates, cap)
            unserved = torch.ones(tokens, dtype=torch.bool, device=logits.device).index_fill(0, token_of, False)
            return Assignments(token_of, expert_of, weight_of, None,
                               torch.bincount(expert_of, minlength=self.num_experts), int(unserved.sum()), tokens,
                               unserved)
        token_ids = (self.sequence.token_ids(rows, tokens, logits.device) if self.routing.force_load_balancing
                     else None)
        expert_index, weights = token_choice(logits, gates, self.top_k, self.routing, self.router.expert_bias,
                                             token_ids)
        keep, every, cap = self.keep_mask(expert_index, weights, rows)
        token_of = torch.arange(tokens, device=logits.device)[:, None].expand_as(expert_index)[keep]
        per_expert = every.sum((0, 1, 2))  # the whole micro-batch's; each expert keeps up to `cap` of them
        return Assignments(token_of, expert_index[keep], weights[keep], expert_index, per_expert,
                           int((per_expert - cap).clamp(min=0).sum()), int(per_expert.sum()), ~keep.any(1),
                           every)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        logits = self.router(x)
        gates, probs = router_scores(logits, self.routing.score_function)
        a = self._assignments(logits, gates, math.prod(shape[:-2]))
        token_of, expert_of, weight_of = a.token_of, a.expert_of, a.weight_of
        aux = None if a.expert_index is None else self._aux_loss(probs, a.expert_index, a.every)
        z = self._z_loss(logits)

        order = torch.argsort(expert_of, stable=True)  # permute: group assignments by expert
        counts = torch.bincount(expert_of, minlength=self.num_experts)
        local_x, local_counts, ctx = self.dispatcher.dispatch(x[token_of[order]], counts)
        y = self.dispatcher.combine(self.experts(local_x, local_counts), ctx)
        y = y * weight_of[order, None].to(y.dtype)
        out = y.new_zeros(x.shape[0], y.shape[-1]).index_add(0, token_of[order], y)  # unpermute and sum top-k
        if hasattr(self, "shared"):
            out = out + self.shared(x).to(out.dtype)
        if hasattr(self, "fallback"):  # run even for no token, so that every rank's weight gets a gradient
            rows = a.unserved.nonzero().squeeze(1)
            out = out.index_add(0, rows, self.fallback(x[rows]).to(out.dtype))

        # What is reported is the whole micro-batch's: the slices' shares summed (nothing to sum in one slice).
        zero = probs.new_zeros(())
        whole = self.sequence.sum(torch.stack([zero if aux is None else aux.detach(),
                                               zero if z is None else z.detach(), entropy_sum(probs.detach())]))
        self.last_aux_loss = whole[0] if aux is not None else None
        self.last_z_loss = whole[1] if z is not None else None
        self.last_stats = RoutingStats(a.tokens_per_expert.detach(), a.dropped, a.assignments, whole[2],
                                       x.shape[0] * self.sequence.slices)
        losses = [t for t in (aux, z) if t is not None]
        if losses:
            out = attach_aux_loss(out, sum(losses[1:], losses[0]))
        return out.reshape(*shape[:-1], out.shape[-1])

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """forward() for a decode step, which drops no token (no capacity limit). A few tokens, no autograd, every
        expert here: each token through its chosen experts' weights as stored, with none of the dispatch
        bookkeeping (the sort, the capacity queue, the stats), which costs more than a step's matrix-vector
        products. Else forward() with capacity_factor 0."""
        x = h.reshape(-1, h.shape[-1])
        many = x.shape[0] > 16 and not torch.compiler.is_compiling()  # (eager: forward's grouped products)
        if (torch.is_grad_enabled() or self.training or many or not isinstance(self.dispatcher, LocalDispatcher)
                or self.routing.force_load_balancing or getattr(self.experts, "etp_group", None) is not None):
            with moe_capacity(self, 0.0):
                return self(h)
        logits = linear(x.float(), self.router.weight.float())
        gates, _ = router_scores(logits, self.routing.score_function)
        expert_index, weights = token_choice(logits, gates, self.top_k, self.routing, self.router.expert_bias)
        out = expert_mix(x, expert_index, weights, self.experts.w1, getattr(self.experts, "w2", None),
                         self.experts.activation)
        if hasattr(self, "shared"):
            out = out + self.shared.step(x).to(out.dtype)
        return out.reshape(*h.shape[:-1], out.shape[-1])

"""Context parallelism (--context-parallel-size): every sequence split into contiguous slices, one per CP rank.

Mamba-1, with communication independent of the sequence length:
- conv: each rank takes the last d_conv - 1 inputs of the previous rank (the halo; their document index too) and
  convolves [halo | slice]; backward hands the halo's gradient back.
- scan: each rank scans its slice from a zero state for its final state h_r and takes the slice's total decay
  a_r = exp(A * sum(dt)) (0 when a document starts inside); a chain over the CP group gives every rank its
  true entering state H_r = a_{r-1} H_{r-1} + h_{r-1}, and the slice is scanned again from it. Backward runs
  the chain the other way (see _ContextScan). One (batch, d_inner, d_state) state per rank each way.
- attention: keys and values gathered over CP, causal against the global positions (RoPE gets them too).
- Switch MoE: each rank routes and runs its own tokens. Capacity counts the whole micro-batch: the ranks
  exchange their per-row, per-expert assignment counts (k x batch x E integers), so each token's place in its
  expert's queue, and so what is dropped, is what one process finds. The load-balancing and z losses are
  summed over the ranks' shares (each divided by the whole micro-batch's token count).
- loss: every rank divides its tokens' loss by the micro-batch's token count; gradients are summed over CP.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.model import Attention, MambaLM, MambaMixer, SwitchMoE
from megamoe.model.attention import document_mask
from megamoe.model.moe import WholeSequence
from megamoe.ops import causal_conv1d, selective_scan
from megamoe.parallel.comm import COUNTER
from megamoe.parallel.tensor_parallel import gather_sequence


def _all_gather(t: torch.Tensor, group, kind: str) -> list:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    COUNTER.add(kind, t.numel() * t.element_size() * (len(parts) - 1))  # a ring all-gather's sends
    return parts


def shift(t: torch.Tensor, group, kind: str, toward_next: bool = True) -> torch.Tensor:
    """Send `t` to the next CP rank and return the previous rank's (zeros on the first rank); with
    toward_next=False the other way (to the previous, from the next; zeros on the last)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    to, source = (rank + 1, rank - 1) if toward_next else (rank - 1, rank + 1)
    out, works = t.new_zeros(t.shape), []  # contiguous, whatever t's strides
    if 0 <= to < size:
        works.append(dist.isend(t.contiguous(), dist.get_global_rank(group, to), group=group))
        COUNTER.add(kind, t.numel() * t.element_size())
    if 0 <= source < size:
        works.append(dist.irecv(out, dist.get_global_rank(group, source), group=group))
    for w in works:
        w.wait()
    return out


class _Halo(torch.autograd.Function):
    """The previous CP rank's `t` (zeros on the first rank); backward hands the gradient back to it."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return shift(t, group, "cp_conv_halo")

    @staticmethod
    def backward(ctx, grad):
        return shift(grad, ctx.group, "cp_conv_halo", toward_next=False), None


def _previous_ids(seq_idx: torch.Tensor, n: int, group) -> torch.Tensor:
    """The previous rank's last `n` document indices (no gradient); the first rank's own first one, repeated (the
    padding before the sequence belongs to no other document)."""
    previous = shift(seq_idx[:, seq_idx.shape[1] - n:], group, "cp_seq_idx")
    return previous if dist.get_rank(group) > 0 else seq_idx[:, :1].expand(-1, n)


def cp_causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, *, group):
    """causal_conv1d of this rank's slice x (batch, channels, L / CP) of the whole sequence."""
    width = weight.shape[-1]
    halo = _Halo.apply(x[..., x.shape[-1] - (width - 1):], group)  # zeros before the sequence, as its padding
    seq = None if seq_idx is None else torch.cat([_previous_ids(seq_idx, width - 1, group), seq_idx], 1)
    return causal_conv1d(torch.cat([halo, x], -1), weight, bias, activation, seq_idx=seq)[..., width - 1:]


def entering_states(decay: torch.Tensor, last: torch.Tensor, group) -> torch.Tensor:
    """H_r = a_{r-1} H_{r-1} + h_{r-1} (H_0 = 0) over the CP group, from every rank's slice decay a and final
    state h from zero (batch, d_inner, d_state): a chain, each rank receiving H_r and sending H_{r+1}. One state
    per rank: the ranks wait on each other in turn (CP - 1 hops) for CP - 1 times fewer bytes than an
    all-gather's."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    state = last.new_zeros(last.shape)
    if rank > 0:
        dist.recv(state, dist.get_global_rank(group, rank - 1), group=group)
    if rank < size - 1:
        dist.send((decay * state + last).contiguous(), dist.get_global_rank(group, rank + 1), group=group)
        COUNTER.add("cp_scan_state", last.numel() * last.element_size())
    return state


def carried_gradients(direct: torch.Tensor, decay: torch.Tensor, group) -> torch.Tensor:
    """The chain backward: G_r = dH_r + a_r G_{r+1} (G_CP = 0); returns G_{r+1}, the gradient of this slice's
    final state, received from the next rank, after sending G_r to the previous one."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    carried = direct.new_zeros(direct.shape)
    if rank < size - 1:
        dist.recv(carried, dist.get_global_rank(group, rank + 1), group=group)
    if rank > 0:
        dist.send((direct + decay * carried).contiguous(), dist.get_global_rank(group, rank - 1), group=group)
        COUNTER.add("cp_scan_state", direct.numel() * direct.element_size())
    return carried


class _ContextScan(torch.autograd.Function):
    """The scan of one CP slice from its true entering state H_r, which depends on every earlier slice.

    Forward: a first scan without autograd (nothing kept) gives this slice's final state from zero, h_r; the
    chain gives H_r; the second scan, from H_r, is the one autograd records (its final state is H_{r+1}).
    Backward, by the scan's linearity in its output and final-state gradients: first the outputs' gradient
    alone (giving dH_r, the gradient of the entering state), then the chain back (G_{r+1}), then G_{r+1}
    through the final state. That last pass holds everything an earlier slice's tokens owe this one, the
    decay's part included, as the final state is a_r H_r + h_r. So the saved activations are one scan's and
    the scan runs twice each way."""

    @staticmethod
    def forward(ctx, group, kwargs, decay, cut, *tensors):
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
        inputs = dict(zip(names, tensors))
        with torch.no_grad():
            _, last = selective_scan(**{**inputs, "D": None, "z": None}, return_last_state=True, **kwargs)
        entering = entering_states(decay, last, group) * cut
        ctx.group, ctx.decay, ctx.cut, ctx.graph = group, decay, cut, None
        if not any(t is not None and t.requires_grad for t in tensors):  # evaluation: no graph to keep
            return selective_scan(**inputs, return_last_state=True, initial_state=entering, **kwargs)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
            h0 = entering.requires_grad_()
            y, final = selective_scan(**dict(zip(names, leaves)), return_last_state=True, initial_state=h0,
                                      **kwargs)
        ctx.graph = (y, final, leaves, h0)
        return y.detach(), final.detach()

    @staticmethod
    def backward(ctx, dy, dfinal):
        y, final, leaves, h0 = ctx.graph
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        first = torch.autograd.grad([y, final], wanted + [h0], [dy, dfinal], retain_graph=True, allow_unused=True)
        carried = carried_gradients(first[-1] * ctx.cut, ctx.decay, ctx.group)
        second = torch.autograd.grad([final], wanted, [carried], allow_unused=True)
        ctx.graph = None
        sums = iter([a if b is None else b if a is None else a + b for a, b in zip(first[:-1], second)])
        return (None, None, None, None) + tuple(next(sums) if t is not None and t.requires_grad else None
                                                for t in leaves)


def cp_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, seq_idx=None, *, group):
    """selective_scan of this rank's slice (batch, d_inner, L / CP), the state carried in from earlier ranks."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32  # as the scan computes
    with torch.no_grad():
        dt = delta.to(compute) + (delta_bias.to(compute)[None, :, None] if delta_bias is not None else 0)
        dt = F.softplus(dt) if delta_softplus else dt
        starts = torch.zeros(u.shape[0], u.shape[2], dtype=torch.bool, device=u.device)
        if seq_idx is not None:  # a document starting anywhere in the slice, its first step too, cuts the carry
            starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            starts[:, 0] = seq_idx[:, 0] != _previous_ids(seq_idx, 1, group)[:, 0]
        whole = (~starts.any(1)).to(dt.dtype)[:, None, None]  # (batch, 1, 1): 1 where the carry crosses it
        decay = torch.exp(A.to(compute)[None] * dt.sum(-1)[..., None]) * whole  # (batch, d_inner, d_state)
        cut = (~starts[:, 0]).to(compute)[:, None, None]  # 0 where a document starts at the slice's first token
    kwargs = dict(delta_softplus=delta_softplus, seq_idx=seq_idx)
    y, final = _ContextScan.apply(group, kwargs, decay, cut, u, delta, A, B, C, D, z, delta_bias)
    return (y, final) if return_last_state else y


def cp_attend(q, k, v, seq_idx=None, *, group):
    """Causal attention of this rank's queries over the keys and values of the whole sequence."""
    rank = dist.get_rank(group)
    # (batch, heads, L, head_dim): every rank's keys and values
    k, v = (gather_sequence(t.transpose(1, 2), group, kind="cp_attention").transpose(1, 2) for t in (k, v))
    key_seq = torch.zeros(q.shape[0], k.shape[2], dtype=torch.int32, device=q.device)
    if seq_idx is not None:
        key_seq = torch.cat(_all_gather(seq_idx, group, "cp_attention"), 1)
    local = seq_idx if seq_idx is not None else key_seq[:, :q.shape[2]]
    mask = document_mask(local, key_seq, offset=rank * q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _count_over(group):
    def count(mask):
        total = mask.sum().detach().clone()
        dist.all_reduce(total, group=group)
        COUNTER.add("cp_loss", total.numel() * total.element_size())
        return total
    return count


class SequenceSlices(WholeSequence):
    """What a Switch MoE of one CP rank needs of the other slices of its micro-batch."""

    def __init__(self, group):
        self.group, self.slices, self.index = group, dist.get_world_size(group), dist.get_rank(group)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(_all_gather(t, self.group, "cp_moe_counts"))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        COUNTER.add("cp_moe_losses", t.numel() * t.element_size())
        return t


def parallelize_context(model: MambaLM, topo) -> None:
    """Swap the sequence ops of every layer for their context-parallel forms (see the module docstring)."""
    group = topo.cp_group
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.causal_conv = functools.partial(cp_causal_conv1d, group=group)
            module.scan = functools.partial(cp_selective_scan, group=group)
        elif isinstance(module, Attention):
            module.attend = functools.partial(cp_attend, group=group)
        elif isinstance(module, SwitchMoE):
            module.sequence = SequenceSlices(group)
    model.count_tokens = _count_over(group)


def local_batch(batch: dict, topo) -> dict:
    """This CP rank's contiguous slice of a micro-batch of whole sequences (every CP rank reads the same ones):
    tokens, labels, loss mask and the packed-document fields, and the global positions RoPE needs."""
    if topo.cp == 1:
        return batch
    out = dict(batch)
    if "position_ids" not in out:
        tokens = out["tokens"]
        out["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return {k: v.chunk(topo.cp, dim=1)[topo.cp_rank].contiguous() for k, v in out.items()}


def sum_over_cp(t: torch.Tensor, topo) -> torch.Tensor:
    """A loss sum over the CP ranks' slices (each holds its tokens' share)."""
    if topo.cp > 1:
        t = t.to(topo.device)
        dist.all_reduce(t, group=topo.cp_group)
    return t.cpu()

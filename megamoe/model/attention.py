"""The Transformer baselines' layers: causal self-attention with RoPE (and its KV cache for generation), and a
dense feed-forward block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.ops.linear import module_linear


def rope_tables(length: int, head_dim: int, base: float, device=None,
                positions: Optional[torch.Tensor] = None) -> tuple:
    """cos, sin of shape (L, head_dim / 2) for rotary position embeddings; with `positions` (batch, L), the
    positions of each token (packed documents each start at 0), (batch, 1, L, head_dim / 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if positions is not None:
        angles = positions.to(torch.float32)[:, None, :, None] * inv_freq
        return angles.cos(), angles.sin()
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def document_mask(seq_idx: torch.Tensor, key_seq_idx: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
    """(batch, 1, Lq, Lk) bool: causal within each packed document, nothing across them (block-diagonal). The
    queries are keys offset .. offset + Lq - 1 (a context-parallel rank's slice of `key_seq_idx`)."""
    key_seq_idx = seq_idx if key_seq_idx is None else key_seq_idx
    q_pos = torch.arange(offset, offset + seq_idx.shape[1], device=seq_idx.device)
    causal = q_pos[:, None] >= torch.arange(key_seq_idx.shape[1], device=seq_idx.device)[None, :]
    return (causal & (seq_idx[:, :, None] == key_seq_idx[:, None, :]))[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, L, head_dim): rotate channel pairs (i, i + head_dim/2) by the position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q over k, v (batch, heads, L, head_dim); with seq_idx, within each packed document."""
    if seq_idx is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seq_idx))


class KVCache:
    """Keys (RoPE applied) and values of the tokens seen so far, (batch, heads, capacity, head_dim) each. Row b
    holds lengths[b] of them: rows differ in a ragged batch and when a slot is reused (continuous batching).
    The capacity doubles when a token does not fit (allocate_cache sizes it for the whole generation)."""

    def __init__(self, capacity: int = 0, batch: int = 0):
        self.capacity = capacity
        self.lengths = [0] * batch
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    def _fit(self, like: torch.Tensor, batch: int, need: int) -> None:
        """Room for `need` positions in every row, keys shaped like `like` (*, heads, *, head_dim)."""
        if self.k is None or need > self.k.shape[2]:
            size = max(self.capacity, 2 * need, 16)
            grown = [like.new_zeros(batch, like.shape[1], size, like.shape[3]) for _ in range(2)]
            if self.k is not None:
                used = self.length
                grown[0][:, :, :used], grown[1][:, :, :used] = self.k[:, :, :used], self.v[:, :, :used]
            self.k, self.v = grown
        if len(self.lengths) != batch:
            self.lengths = [0] * batch

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Add (batch, heads, n, head_dim) keys and values to rows all of one length; return all of them so far."""
        start, n = self.length, k.shape[2]
        if len(set(self.lengths)) > 1:
            raise ValueError(f"KVCache.append: rows hold {sorted(set(self.lengths))} tokens; use step()")
        self._fit(k, k.shape[0], start + n)
        self.k[:, :, start:start + n], self.v[:, :, start:start + n] = k, v
        self.lengths = [start + n] * k.shape[0]
        return self.k[:, :, :start + n], self.v[:, :, :start + n]

    def step(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Add one token per row (batch, heads, 1, head_dim), each after its row's own; return (keys, values, mask)
        up to the longest row, mask (batch, 1, 1, length) bool the keys of each row's own (None when all rows
        have the same length)."""
        if len(set(self.lengths)) <= 1:
            return (*self.append(k, v), None)
        batch, end = k.shape[0], self.length + 1
        self._fit(k, batch, end)
        at = torch.tensor(self.lengths, device=k.device)
        rows = torch.arange(batch, device=k.device)
        self.k[rows, :, at], self.v[rows, :, at] = k[:, :, 0], v[:, :, 0]
        self.lengths = [n + 1 for n in self.lengths]
        mask = torch.arange(end, device=k.device) <= at[:, None]
        return self.k[:, :, :end], self.v[:, :, :end], mask[:, None, None]

    def positions(self, device) -> torch.Tensor:
        """(batch, 1) the position of each row's next token."""
        return torch.tensor(self.lengths, device=device)[:, None]

    def insert(self, rows: list, other: "KVCache") -> None:
        """Row rows[i] becomes other's row i (a prompt prefilled apart); what the row held before is dropped."""
        if other.k is None:
            return
        self._fit(other.k, self.k.shape[0] if self.k is not None else len(self.lengths), other.length)
        for i, row in enumerate(rows):
            n = other.lengths[i]
            self.k[row, :, :n], self.v[row, :, :n] = other.k[i, :, :n], other.v[i, :, :n]
            self.lengths[row] = n

    def release(self, rows: list) -> None:
        """Empty these rows: their keys are never read again (masked out) and are overwritten by the next."""
        for row in rows:
            self.lengths[row] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; `qkv` produces [q | k | v], each num_heads x head_dim."""

    def __init__(self, d_model: int, num_heads: int, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = num_heads, d_model // num_heads, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.attend = attend  # context parallelism swaps it for one over the whole sequence's keys

    def forward(self, h: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): packed documents attend only within
        themselves; position_ids (batch, L): RoPE positions (default 0 .. L - 1)."""
        batch, length, _ = h.shape
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # under TP each holds this rank's heads
        q, k, v = (t.reshape(batch, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = rope_tables(length, self.head_dim, self.rope_base, h.device, position_ids)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, seq_idx)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, -1))

    def forward_cached(self, x: torch.Tensor, kv: KVCache, prefill: bool) -> torch.Tensor:
        """Attention of x (batch, n, d_model) over the cached tokens and itself. prefill: the prompts (rows all
        empty, n tokens each, causal); else one token per row at its row's own position, attending to its row."""
        batch, n, _ = x.shape
        q, k, v = (self.qkv(x) if prefill else module_linear(self.qkv, x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if prefill:
            cos, sin = rope_tables(n, self.head_dim, self.rope_base, x.device)
        else:  # the same angles to the bit as the full forward's table at these positions
            cos, sin = rope_tables(1, self.head_dim, self.rope_base, x.device, kv.positions(x.device))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if prefill:
            kv.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        else:
            k, v, mask = kv.step(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return module_linear(self.out_proj, y.transpose(1, 2).reshape(batch, n, -1))
        return self.out_proj(y.transpose(1, 2).reshape(batch, n, -1))


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The feed-forward nonlinearity (dense FFN and experts): gelu, relu, or swiglu on x = [gate | up]."""
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(x) if activation == "gelu" else F.relu(x)


class FeedForward(nn.Module):
    """Dense FFN: fc2(act(fc1 x)); "swiglu" makes fc1 produce [gate | up]."""

    def __init__(self, d_model: int, d_ffn: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, 2 * d_ffn if activation == "swiglu" else d_ffn, bias=False)
        self.fc2 = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(activate(self.fc1(h), self.activation))

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """forward() for a decode step, through ops.linear (see there)."""
        return module_linear(self.fc2, activate(module_linear(self.fc1, h), self.activation))

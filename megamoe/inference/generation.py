"""Recurrent text generation with a whole MambaLM (PP = 1; in one process or TP-sharded), constant memory per Mamba
sequence.

    cache  = allocate_cache(model, batch)
    logits = forward_cached(model, tokens, cache)     first call: the prompt at once; later: token by token
    ids    = generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eod, seed)

The model comes from megamoe.inference.loading.load_for_inference (a checkpoint of any layout, in one process, or
with tensor_parallel=N over the N processes of a torchrun launch).

Tensor parallelism (a model larger than one device): every TP rank runs the same calls on its shards of each
layer (the TP layers reduce as in training), the vocabulary-sharded logits are gathered after the head, and the
sampled tokens are broadcast from TP rank 0, so every rank holds the same tokens and ends at the same step.

What each block keeps between tokens:
    M   MambaMixer.prefill leaves the prompt's last (conv_state, ssm_state); MambaMixer.step advances them one
        token: d_inner x (d_conv + d_state) numbers per layer and sequence, whatever the length.
    E F per-token layers, run on the (batch, 1, d_model) slice of the token being decoded; nothing kept.
    A   a KV cache: keys (RoPE applied at their absolute positions) and values of every past token; each step
        is one query over them. It grows with the length, as any Transformer's does.
    ME  Parallel MoE-Mamba: the Mamba state, with the MoE on the same normed input, summed as Block.forward does.

MoE capacity: generation runs every Switch MoE without a capacity limit (capacity_factor 0), in the prompt and in
the steps. Capacity is counted per call over all tokens of the call, so a limit would make a sequence's tokens
depend on the other sequences of the batch and on how its prompt was split into calls. A full-sequence forward
with capacity_factor > 0 may drop tokens, so decoding equals it only when the model has capacity_factor 0.

Ragged batches (prompts of different lengths): each prompt is prefilled into its own row from empty states,
prompts of one length as one batch (`prefill`); then the rows step together, each at its own position (a Mamba
state needs none; attention takes per-row RoPE positions and masks every row to its own keys, KVCache.step).
So a row's prefill is exactly the computation of its prompt alone, and the batch only meets in the step, where
every op is row-wise: each row decodes what it would alone. Left-padding with the packed-documents index
(seq_idx) would also be exact in arithmetic, but runs the pads through every layer and takes other paths (the
conv's cross-document corrections, masked prefill attention) that round differently from a prompt alone; and
prefilling into a row is what continuous batching needs anyway (engine.py: a freed row takes a new request).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.config import block_kinds
from megamoe.errors import InferenceError
from megamoe.model import KVCache, LocalDispatcher, MambaLM, moe_capacity
from megamoe.model.lm import count_tokens  # context parallelism counts over its group instead
from megamoe.ops.linear import module_linear
from megamoe.parallel.tensor_parallel import gather_from_tp


@dataclass
class InferenceCache:
    """Per block (by its name in model.layers): a Mamba (conv_state, ssm_state) or a KVCache, `batch` rows."""

    batch: int
    states: dict = field(default_factory=dict)
    lengths: list = field(default_factory=list)  # per row: tokens consumed, the position of its next one

    def __post_init__(self):
        self.lengths = self.lengths or [0] * self.batch

    @property
    def length(self) -> int:
        """The longest row's length (every row's, unless ragged)."""
        return max(self.lengths, default=0)

    def nbytes(self) -> int:
        total = 0
        for state in self.states.values():
            total += state.nbytes() if isinstance(state, KVCache) else sum(t.numel() * t.element_size() for t in state)
        return total

    def insert(self, rows: list, other: "InferenceCache") -> None:
        """Row rows[i] takes other's row i (prompts prefilled apart); what those rows held is dropped."""
        for name, state in self.states.items():
            if isinstance(state, KVCache):
                state.insert(rows, other.states[name])
            else:
                index = torch.tensor(rows, device=state[0].device)
                for mine, theirs in zip(state, other.states[name]):
                    mine.index_copy_(0, index, theirs)
        for i, row in enumerate(rows):
            self.lengths[row] = other.lengths[i]

    def release(self, rows: list) -> None:
        """Empty these rows (a finished sequence's): Mamba states zeroed, KV rows emptied."""
        for state in self.states.values():
            if isinstance(state, KVCache):
                state.release(rows)
            else:
                for t in state:
                    t[rows] = 0
        for row in rows:
            self.lengths[row] = 0


def tp_group(model):
    """The process group the model's layers are tensor-parallel over, or None for an unsharded model."""
    group = getattr(model.lm_head, "tp_group", None)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return group


def check_model(model) -> None:
    """InferenceError unless `model` is a whole MambaLM: unsharded, or sharded by tensor parallelism alone (no
    pipeline stage, expert-parallel, sequence-parallel or context-parallel shards)."""
    if not isinstance(model, MambaLM):
        raise InferenceError(f"generation runs a megamoe MambaLM, not a {type(model).__name__}")
    kinds = block_kinds(model.cfg)
    if not (model.pre_process and model.post_process) or len(model.layers) != len(kinds):
        raise InferenceError("the model is one pipeline stage; generation needs every layer in each process "
                             "(load the checkpoint with load_for_inference, which builds it with PP 1)")
    group = tp_group(model)
    tp = dist.get_world_size(group) if group is not None else 1
    # A TP-split MoE's dispatcher wraps the local one (TPSplitDispatcher.inner); EP exchanges tokens instead.
    expert_parallel = any(not isinstance(getattr(m.dispatcher, "inner", m.dispatcher), LocalDispatcher)
                          for m in model.moe_layers())
    split = any(b.mixer.conv1d.weight.shape[0] * tp != b.mixer.d_inner
                for b in model.layers.values() if hasattr(b, "mixer"))
    head = getattr(model.lm_head, "weight", None)
    if expert_parallel or split or head is None or head.shape[0] * tp != model.cfg.vocab_size:
        raise InferenceError("the model is sharded by expert parallelism (or unevenly); generation runs it whole "
                             "or tensor-parallel (load the checkpoint with load_for_inference)")
    sequence_parallel = any(getattr(p, "sequence_parallel", False) for p in model.norm_f.parameters())
    if sequence_parallel or model.count_tokens is not count_tokens:
        raise InferenceError("the model is built for sequence or context parallelism, which split the sequence; "
                             "decoding takes one token at a time (load it with load_for_inference)")


def allocate_cache(model, batch: int, max_length: Optional[int] = None) -> InferenceCache:
    """Empty states for `batch` sequences; `max_length` (prompt + new tokens) pre-sizes the KV caches."""
    check_model(model)
    return _allocate(model, batch, max_length)


def _allocate(model, batch: int, max_length: Optional[int]) -> InferenceCache:
    cache = InferenceCache(batch)
    for name, block in model.layers.items():
        if hasattr(block, "mixer"):
            cache.states[name] = block.mixer.allocate_inference_cache(batch)
        elif hasattr(block, "attention"):
            cache.states[name] = KVCache(max_length or 0, batch)
    return cache


@torch.no_grad()
def forward_cached(model, tokens: torch.Tensor, cache: InferenceCache, last_only: bool = False) -> torch.Tensor:
    """Logits (batch, n, vocab) of `tokens` (batch, n) following what `cache` has seen, which it then holds.
    Into an empty cache the prompts go at once (prefill); else the tokens go one at a time, each row at its own
    position. last_only: logits of the last token alone (batch, 1, vocab)."""
    if tokens.dim() != 2 or tokens.shape[0] != cache.batch or tokens.shape[1] == 0:
        raise InferenceError(f"tokens of shape {tuple(tokens.shape)} for a cache of {cache.batch} sequences; "
                             f"give (batch={cache.batch}, n >= 1) token ids")
    empty = not any(cache.lengths)
    if not empty and tokens.shape[1] > 1:  # MambaMixer.prefill starts from empty states
        logits = [forward_cached(model, tokens[:, i:i + 1], cache, last_only) for i in range(tokens.shape[1])]
        return logits[-1] if last_only else torch.cat(logits, dim=1)
    tokens = tokens.to(model.embedding.weight.device)
    if empty:
        with moe_capacity(model, 0.0):  # a step has none (SwitchMoE.step)
            h = model.embed(tokens)
            for name, block in model.layers.items():
                h = block.forward_cached(h, cache.states.get(name), True)
            logits = model.head(h[:, -1:] if last_only else h)
    else:  # a step, compiled by megamoe.inference.compiled.compile_decoding if it was called
        step = model.__dict__.get("compiled_step", decode_step)
        if any(isinstance(state, KVCache) for state in cache.states.values()):  # it may grow a KV cache, which
            logits = step(model, tokens, cache.states)  # as an inference tensor could not be updated outside
        else:  # Mamba states, allocated outside and updated in place: no autograd dispatch at all (0.93 of an
            with torch.inference_mode():  # eager step on CPU)
                logits = step(model, tokens, cache.states)
            logits = logits.clone()  # a plain tensor, which callers may mask in place
    cache.lengths = [n + tokens.shape[1] for n in cache.lengths]
    group = tp_group(model)
    return logits if group is None else gather_from_tp(logits, group)  # the vocabulary's shards, in order


def decode_step(model, tokens: torch.Tensor, states: dict) -> torch.Tensor:
    """Logits (batch, 1, vocab) of one token per row (batch, 1), advancing `states` (InferenceCache.states)."""
    h = model.embed(tokens)
    for name, block in model.layers.items():
        h = block.forward_cached(h, states.get(name), False)
    return module_linear(model.lm_head, model.norm_f(h))


@torch.no_grad()
def prefill(model, cache: InferenceCache, rows: list, prompts: list) -> torch.Tensor:
    """Prompts (lists of ids, of any lengths) into the cache's `rows`, replacing what those held; returns the
    logits of each prompt's last token (len(rows), vocab). Prompts of one length run as one batch."""
    device = model.embedding.weight.device
    groups: dict = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)
    if len(groups) == 1 and not any(cache.lengths) and list(rows) == list(range(cache.batch)):
        return forward_cached(model, torch.tensor(prompts, device=device), cache, last_only=True)[:, -1]
    logits: list = [None] * len(prompts)
    for length, members in groups.items():
        part = _allocate(model, len(members), length)
        out = forward_cached(model, torch.tensor([prompts[i] for i in members], device=device), part, True)[:, -1]
        cache.insert([rows[i] for i in members], part)
        for j, i in enumerate(members):
            logits[i] = out[j]
    return torch.stack(logits)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits (batch, vocab) with -inf outside the top_k largest and outside the nucleus: the fewest most likely
    tokens whose probabilities sum to at least top_p (the most likely one always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens (batch,) from logits (batch, vocab): argmax when temperature == 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _prompt_list(prompt_ids) -> tuple:
    """(prompts as lists of ids, whether one prompt was given) from ids, a list of lists, or a tensor."""
    if isinstance(prompt_ids, torch.Tensor):
        single = prompt_ids.dim() == 1
        prompts = prompt_ids.reshape(1, -1).tolist() if single else prompt_ids.tolist()
    else:
        prompts = list(prompt_ids)
        single = not prompts or not isinstance(prompts[0], (list, tuple, torch.Tensor))
        prompts = [list(map(int, prompts))] if single else [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InferenceError("the prompt is empty; give at least one token (e.g. the tokenizer's eod to start a "
                             "document)")
    return prompts, single


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eod: Optional[int] = None, seed: Optional[int] = None,
             vocab_size: Optional[int] = None):
    """Continue the prompt(s) by up to max_new_tokens tokens, recurrently (see the module docstring).

    prompt_ids: one prompt (a list of ids or a 1-D tensor), or a batch (a list of lists of any lengths, or a
    (batch, L) tensor), each row decoding what it would alone (greedy; sampling draws from one generator for
    the batch: engine.py gives each request its own). temperature 0 is greedy; top_k / top_p restrict sampling;
    seed makes it reproducible (else torch's global generator is used). A sequence stops after emitting `eod`.
    vocab_size: only ids below it are produced (the tokenizer's size; the model's vocabulary is padded beyond).
    Returns the new ids: a list for one prompt, a list of lists for a batch, each ending at its first eod."""
    check_model(model)
    for name, value, ok, want in (("max_new_tokens", max_new_tokens, max_new_tokens >= 0, ">= 0"),
                                  ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
                                  ("top_k", top_k, top_k is None or top_k >= 1, ">= 1"),
                                  ("top_p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1]")):
        if not ok:
            raise InferenceError(f"{name}={value} must be {want}")
    device = model.embedding.weight.device
    prompts, single = _prompt_list(prompt_ids)
    batch = len(prompts)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    group = tp_group(model)
    cache = _allocate(model, batch, max(map(len, prompts)) + max_new_tokens)
    new, done = [], torch.zeros(batch, dtype=torch.bool, device=device)
    logits = prefill(model, cache, list(range(batch)), prompts) if max_new_tokens else None
    for i in range(max_new_tokens):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = sample(logits, temperature, top_k, top_p, generator)
        if group is not None:  # every TP rank continues with rank 0's draw
            dist.broadcast(token, dist.get_global_rank(group, 0), group=group)
        if eod is not None:
            token = torch.where(done, torch.full_like(token, eod), token)
            done |= token == eod
        new.append(token)
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = forward_cached(model, token[:, None], cache, last_only=True)[:, -1]
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(batch)]
    if eod is not None:
        rows = [row[:row.index(eod) + 1] if eod in row else row for row in rows]
    return rows[0] if single else rows

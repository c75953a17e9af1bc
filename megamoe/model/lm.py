"""The language model: embedding -> pre-norm residual blocks by pattern -> final norm -> LM head.

Pattern letters (megatron-core's hybrid convention): M Mamba, E Switch MoE, A attention, F dense FFN; `|` marks
an explicit pipeline-stage boundary. MoE-Mamba is "ME" x N. With `parallel_moe`, each "ME" pair becomes one
Parallel MoE-Mamba block whose Mamba and MoE read the same normed input.

Plain PyTorch, no ranks: megamoe.parallel shards a built model from outside. Every block is initialised from its
own random stream (seed, global block index), so a pipeline stage that builds only its blocks gets exactly the
weights the whole model would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megamoe.config import ModelConfig, block_kinds
from megamoe.model.attention import Attention, FeedForward
from megamoe.model.mamba import MambaMixer
from megamoe.model.moe import SwitchMoE
from megamoe.model.router import Routing
from megamoe.ops.seq_idx import check_seq_idx


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype (as Mamba's reference and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


def routing_of(cfg: ModelConfig) -> Routing:
    """The model config's router_* keys as the MoE layers' Routing."""
    return Routing(cfg.router_score_function, cfg.router_pre_softmax, cfg.router_renormalize, cfg.router_type,
                   cfg.router_load_balancing_type, cfg.token_drop_policy, cfg.router_force_load_balancing)


def make_moe(cfg: ModelConfig, d_in: Optional[int] = None, d_out: Optional[int] = None) -> SwitchMoE:
    """The Switch MoE of an E block (with the shared expert, if any), or (with d_in/d_out) one of linear experts
    replacing a Mamba projection (with the dense fallback, if asked)."""
    linear = d_in is not None
    return SwitchMoE(d_in or cfg.d_model, cfg.num_experts, cfg.resolved_d_expert, top_k=cfg.top_k,
                     capacity_factor=cfg.capacity_factor, load_balancing_weight=cfg.load_balancing_weight,
                     z_loss_weight=cfg.z_loss_weight, activation="linear" if linear else cfg.expert_activation,
                     d_out=d_out, routing=routing_of(cfg), expert_bias=cfg.router_enable_expert_bias,
                     shared_expert_size=None if linear else cfg.shared_expert_intermediate_size,
                     dense_fallback=linear and cfg.mamba_moe_dense_fallback)


def make_mamba(cfg: ModelConfig, mamba_index: int) -> MambaMixer:
    """The `mamba_index`-th Mamba mixer; MoE projections go to every layer or every other one (odd indices)."""
    every = cfg.mamba_moe_every
    projections = cfg.mamba_moe_projections if mamba_index % every == every - 1 else ()
    return MambaMixer(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.resolved_dt_rank, cfg.dt_min,
                      cfg.dt_max, cfg.dt_init_floor, cfg.conv_bias, cfg.proj_bias, d_inner=cfg.d_inner,
                      moe_factory=lambda d_in, d_out: make_moe(cfg, d_in, d_out), moe_projections=projections)


class Block(nn.Module):
    """Pre-norm residual block: h + sublayers(norm(h)); several sublayers (Parallel MoE-Mamba) are summed."""

    recompute = False  # keep only the block's input for backward and recompute the rest (activation recompute)

    def __init__(self, kind: str, cfg: ModelConfig, mamba_index: int = 0):
        super().__init__()
        self.kind = kind
        self.norm = make_norm(cfg)
        if "M" in kind:
            self.mixer = make_mamba(cfg, mamba_index)
        if "E" in kind:
            self.moe = make_moe(cfg)
        if kind == "A":
            self.attention = Attention(cfg.d_model, cfg.num_heads, cfg.rope_base)
        if kind == "F":
            self.ffn = FeedForward(cfg.d_model, cfg.resolved_d_ffn, cfg.expert_activation)

    def sublayers(self) -> list:
        return [getattr(self, name) for name in ("mixer", "moe", "attention", "ffn") if hasattr(self, name)]

    def forward(self, h: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h (batch, L, d_model); seq_idx, position_ids (batch, L): packed documents (see megamoe.data.packing)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, h, seq_idx, position_ids, use_reentrant=False)
        return self._forward(h, seq_idx, position_ids)

    def _forward(self, h: torch.Tensor, seq_idx=None, position_ids=None) -> torch.Tensor:
        x = self.norm(h)
        out = h
        for sublayer in self.sublayers():
            if sublayer is getattr(self, "mixer", None):
                out = out + sublayer(x, seq_idx=seq_idx)
            elif sublayer is getattr(self, "attention", None):
                out = out + sublayer(x, seq_idx=seq_idx, position_ids=position_ids)
            else:  # MoE and FFN work token by token: documents do not concern them
                out = out + sublayer(x)
        return out

    def forward_cached(self, h: torch.Tensor, state, prefill: bool) -> torch.Tensor:
        """forward() for generation, carrying `state` (the mixer's (conv, ssm) states or attention's KVCache):
        the prompts from empty states (prefill), then one token per row. MoE and FFN are per token, keep nothing."""
        x = self.norm(h)
        out = h
        for sublayer in self.sublayers():
            if sublayer is getattr(self, "mixer", None):
                out = out + (sublayer.prefill(x, state) if prefill else sublayer.step(x, state))
            elif sublayer is getattr(self, "attention", None):
                out = out + sublayer.forward_cached(x, state, prefill)
            else:
                out = out + (sublayer(x) if prefill else sublayer.step(x))
        return out


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a stream name; stable across processes and Python runs."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, name: str):
    """Initialise what is built inside from the stream (seed, name), leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(stream_seed(seed, name))
        yield


@dataclass
class LMOutput:
    loss: Optional[torch.Tensor]  # lm_loss + aux_loss + z_loss (the aux terms detached: see moe.attach_aux_loss)
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    logits: torch.Tensor  # (batch, L, vocab), or this rank's vocab shard under tensor parallelism
    moe_stats: Optional[dict]


def moe_summary(moes: list) -> tuple:
    """(aux loss, z loss, stats) of these MoE layers' last forward, detached, on CPU. stats (None without MoE
    layers): tokens_per_expert (layers, E), dropped and assignments (counts), fraction_dropped, and per layer
    its name (`layers`) and RoutingStats.row (`rows`, (layers, E + 4))."""
    zero = torch.zeros(())
    aux = sum((m.last_aux_loss.float().cpu() for m in moes if m.last_aux_loss is not None), zero)
    z = sum((m.last_z_loss.float().cpu() for m in moes if m.last_z_loss is not None), zero)
    if not moes or any(m.last_stats is None for m in moes):
        return aux, z, None
    dropped = sum(m.last_stats.dropped for m in moes)
    assignments = sum(m.last_stats.assignments for m in moes)
    stats = dict(tokens_per_expert=torch.stack([m.last_stats.tokens_per_expert.cpu() for m in moes]),
                 dropped=dropped, assignments=assignments, fraction_dropped=dropped / max(1, assignments),
                 layers=[m.layer_name for m in moes], rows=torch.stack([m.last_stats.row() for m in moes]))
    return aux, z, stats


class MoETotals:
    """Running sums, over a step's micro-batches, of what moe_summary reports: the aux and z losses, and a table
    with one row per MoE layer of the whole model (`layer_names`), RoutingStats.row's columns."""

    def __init__(self, layer_names: list, num_experts: int):
        self.row_of = {name: i for i, name in enumerate(layer_names)}
        self.losses = torch.zeros(2, dtype=torch.float64)  # aux loss, z loss
        self.table = torch.zeros(len(layer_names), num_experts + 4, dtype=torch.float64)

    def add(self, aux: torch.Tensor, z: torch.Tensor, stats: Optional[dict]) -> None:
        self.losses += torch.tensor([float(aux), float(z)], dtype=torch.float64)
        if stats:
            for name, row in zip(stats["layers"], stats["rows"]):
                self.table[self.row_of[name]] += row


def moe_layer_names(cfg: ModelConfig) -> list:
    """The names of the model's MoE layers in order (layers.1.moe, layers.0.mixer.out_proj, ...)."""
    return [m.layer_name for m in meta_model(cfg).moe_layers()]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (batch, L), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def count_tokens(mask: torch.Tensor) -> torch.Tensor:
    """The tokens a loss is averaged over (context parallelism counts every rank's slice)."""
    return mask.sum()


def masked_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor], count=count_tokens) -> torch.Tensor:
    mask = torch.ones_like(per_token) if loss_mask is None else loss_mask.float()
    return (per_token * mask).sum() / count(mask).clamp(min=1.0)


class MambaLM(nn.Module):
    """The whole model, or one pipeline stage of it (`blocks`: the global block indices it holds).

    `block_hook(block)` is applied to each block as soon as it is built (parallelism shards it there, so the
    whole unsharded model never sits in memory). `cross_entropy` is what tensor parallelism swaps."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, blocks: Optional[Sequence[int]] = None,
                 pre_process: bool = True, post_process: bool = True, block_hook=None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        kinds = block_kinds(cfg)
        blocks = list(range(len(kinds))) if blocks is None else list(blocks)
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            with seeded(seed, "embedding"):
                self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
                nn.init.normal_(self.embedding.weight, std=cfg.init_std)
        self.layers = nn.ModuleDict()
        mamba_index = [sum("M" in k for k in kinds[:i]) for i in range(len(kinds))]
        for i in blocks:
            with seeded(seed, f"layers.{i}"):
                block = Block(kinds[i], cfg, mamba_index[i])
            for name, module in block.named_modules():
                if isinstance(module, SwitchMoE):
                    module.layer_name = f"layers.{i}.{name}"
            self.layers[str(i)] = block_hook(block) if block_hook else block
        if post_process:
            self.norm_f = make_norm(cfg)
            # Untied, or tied across pipeline stages: the last stage's copy starts from the embedding's stream.
            with seeded(seed, "embedding" if cfg.tie_embeddings else "lm_head"):
                self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
                nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
            if cfg.tie_embeddings and pre_process:
                self.lm_head.weight = self.embedding.weight
        self.cross_entropy = cross_entropy
        self.count_tokens = count_tokens

    def moe_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, SwitchMoE)]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def run_layers(self, h: torch.Tensor, seq_idx=None, position_ids=None) -> torch.Tensor:
        for block in self.layers.values():
            h = block(h, seq_idx, position_ids)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(h))

    def stage_forward(self, x: torch.Tensor, seq_idx=None, position_ids=None) -> torch.Tensor:
        """tokens or hidden states in; hidden states or logits out (what a pipeline stage computes)."""
        h = self.embed(x) if self.pre_process else x
        h = self.run_layers(h, seq_idx, position_ids)
        return self.head(h) if self.post_process else h

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> LMOutput:
        """tokens (batch, L); seq_idx (batch, L) int32: the packed document of each token (Mamba's conv and scan
        restart and attention stays within each); position_ids (batch, L): RoPE positions."""
        if seq_idx is not None:  # once per forward, here: the ops skip the order check on a GPU
            check_seq_idx(seq_idx, tokens.shape[0], tokens.shape[1], "MambaLM")
        logits = self.stage_forward(tokens, seq_idx, position_ids)
        aux, z, stats = moe_summary(self.moe_layers())
        lm_loss = loss = None
        if labels is not None:
            lm_loss = masked_mean(self.cross_entropy(logits, labels), loss_mask, self.count_tokens)
            loss = lm_loss + (aux + z).to(lm_loss.device)
        return LMOutput(loss, lm_loss, aux, z, logits, stats)


def build_model(cfg: ModelConfig, seed: int = 0, **stage) -> MambaLM:
    """The model (or a pipeline stage of it: blocks=..., pre_process=..., post_process=...), built on CPU."""
    return MambaLM(cfg, seed=seed, **stage)


def meta_model(cfg: ModelConfig) -> MambaLM:
    """The model on the meta device (shapes, no memory): for counting parameters."""
    with torch.device("meta"):
        return MambaLM(dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 1))


def active_parameters(module: nn.Module) -> float:
    """Parameters one token uses: all of `module`'s, each Switch MoE's experts at top_k / num_experts."""
    total = sum(p.numel() for p in module.parameters())
    unused = sum(p.numel() * (1 - m.top_k / m.num_experts)
                 for m in module.modules() if isinstance(m, SwitchMoE) for p in m.experts.parameters())
    return total - unused


def count_parameters(cfg: ModelConfig) -> dict:
    """Total and active (per token) parameters, with and without embeddings, counted on a meta-device model.

    Active counts each MoE layer's experts at top_k / num_experts. The embedding counts once when tied."""
    model = meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    active = active_parameters(model)
    embedding = model.embedding.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    return dict(total=total, active=int(active), embedding=embedding, total_non_embedding=total - embedding,
                active_non_embedding=int(active - embedding), experts=expert)

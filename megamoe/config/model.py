"""The architecture config (`model:`) and the rules that derive its defaults (d_inner, dt_rank, the vocabulary)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megamoe.config.options import option
from megamoe.config.pattern import LAYER_KINDS, check_letters
from megamoe.errors import ConfigError

MAMBA_MOE_PROJECTIONS = ("conv", "gate", "output")
EXPERT_ACTIVATIONS = ("gelu", "relu", "swiglu")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_TYPES = ("token_choice", "expert_choice")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
TOKEN_DROP_POLICIES = ("position", "probs")


def mamba_d_inner(d_model: int, expand: int, d_inner: Optional[int] = None) -> int:
    """The Mamba mixer's inner width: `d_inner` when given, else expand x d_model (the reference layer's)."""
    return d_inner or expand * d_model


def mamba_dt_rank(d_model: int, dt_rank: Optional[int] = None) -> int:
    """The rank of the dt projection: `dt_rank` when given, else ceil(d_model / 16) (the reference layer's)."""
    return dt_rank or math.ceil(d_model / 16)


@dataclass
class ModelConfig:
    """Architecture. `pattern` lists the layers: M Mamba, E Switch MoE, A attention, F dense FFN."""

    pattern: str = option("MEMEMEME", "the layer stack: " + ", ".join(f"{k} {v}" for k, v in LAYER_KINDS.items())
                          + "; '|' marks pipeline-stage boundaries")
    d_model: int = option(256, "hidden size")
    vocab_size: Optional[int] = option(None, "None: the tokenizer's size, padded to make_vocab_size_divisible_by x TP")
    make_vocab_size_divisible_by: int = option(128, "the padded vocabulary is a multiple of this x TP (Megatron's)")
    # Mamba-1 mixer (defaults of the reference layer)
    d_state: int = option(16, "Mamba: SSM state size per channel")
    d_conv: int = option(4, "Mamba: width of the causal depthwise convolution")
    expand: int = option(2, "Mamba: d_inner = expand x d_model")
    mamba_d_inner: Optional[int] = option(None, "None: expand x d_model; set it for the paper's fractional expansions")
    dt_rank: Optional[int] = option(None, "None: ceil(d_model / 16)")
    dt_min: float = option(0.001, "Mamba: smallest initial dt (log-uniform in [dt_min, dt_max])")
    dt_max: float = option(0.1, "Mamba: largest initial dt")
    dt_init_floor: float = option(1e-4, "Mamba: initial dt is at least this")
    conv_bias: bool = option(True, "Mamba: bias in the depthwise convolution")
    proj_bias: bool = option(False, "Mamba: biases in in_proj and out_proj")
    # Switch MoE (the paper's defaults) and megatron-core's routing options (docs/moe_routing.md)
    num_experts: int = option(8, "Switch MoE: experts per MoE layer")
    d_expert: Optional[int] = option(None, "None: 3 x d_model (small values and many experts: fine-grained)")
    top_k: int = option(1, "Switch MoE: experts per token (Switch: 1)")
    capacity_factor: Optional[float] = option(1.0, "None or <= 0: no capacity limit (dropless)")
    token_drop_policy: str = option("position", "over capacity, drop an expert's latest assignments (position: "
                                                "first choices before second, in token order) or its lowest-"
                                                "weighted ones (probs)")
    load_balancing_weight: float = option(0.01, "weight of Switch's load-balancing loss (alpha)")
    z_loss_weight: float = option(0.0, "weight of the router z-loss (0: off)")
    router_load_balancing_type: str = option("aux_loss", "aux_loss (per micro-batch), seq_aux_loss (per "
                                                         "sequence), global_aux_loss (expert fractions of the "
                                                         "global batch), none")
    router_score_function: str = option("softmax", "softmax | sigmoid")
    router_pre_softmax: bool = option(True, "scores over all experts, then top-k (Switch); false: top-k of the "
                                            "logits, then softmax over the chosen (Megatron's default)")
    router_renormalize: Optional[bool] = option(None, "the chosen experts' weights divided by their sum; None: "
                                                      "Megatron's rule (sigmoid with top-k > 1 only)")
    router_type: str = option("token_choice", "token_choice | expert_choice (each expert takes its top tokens of "
                                              "the micro-batch: not causal, training studies only)")
    router_enable_expert_bias: bool = option(False, "aux-loss-free balancing: a per-expert bias on the scores "
                                                    "for choosing, updated after each step from the global "
                                                    "batch's loads")
    router_bias_update_rate: float = option(1e-3, "what the expert bias moves by per step (DeepSeek-V3's 1e-3)")
    router_force_load_balancing: bool = option(False, "ignore the router's choice and deal tokens evenly over the "
                                                      "experts (throughput and memory planning)")
    shared_expert_intermediate_size: Optional[int] = option(None, "width of a dense shared expert every token "
                                                                  "of an E block goes through; None: none")
    expert_activation: str = option("gelu", "gelu | relu | swiglu (experts and dense FFNs)")
    # Paper variants
    parallel_moe: bool = option(False, "Parallel MoE-Mamba: Mamba and MoE read the same normed input")
    mamba_moe_projections: list = option(help="subset of conv, gate, output", factory=list)
    mamba_moe_every: int = option(1, "1: every Mamba layer, 2: every other one")
    mamba_moe_dense_fallback: bool = option(False, "MoE projections: a token none of whose experts kept it goes "
                                                   "through a dense projection of the same shape (else it gets 0)")
    # Attention / dense FFN (baselines)
    num_heads: int = option(8, "attention heads")
    d_ffn: Optional[int] = option(None, "None: 4 x d_model")
    rope_base: float = option(10000.0, "RoPE base frequency")
    # Common
    norm: str = option("rmsnorm", "rmsnorm | layernorm")
    norm_eps: float = option(1e-5, "epsilon of the norms")
    tie_embeddings: bool = option(True, "the LM head shares the embedding's weights")
    init_std: float = option(0.02, "standard deviation of the embedding and LM head initialisation")

    @property
    def d_inner(self) -> int:
        return mamba_d_inner(self.d_model, self.expand, self.mamba_d_inner)

    @property
    def resolved_dt_rank(self) -> int:
        return mamba_dt_rank(self.d_model, self.dt_rank)

    @property
    def resolved_d_expert(self) -> int:
        return self.d_expert or 3 * self.d_model

    @property
    def resolved_d_ffn(self) -> int:
        return self.d_ffn or 4 * self.d_model

    def padded_vocab_size(self, tokenizer_vocab: Optional[int], tp: int, tokenizer_name: str = "") -> int:
        """The model's vocabulary: vocab_size as configured, else the tokenizer's padded to a multiple of
        make_vocab_size_divisible_by x TP (Megatron's rule, so every TP shard is the same size)."""
        if self.vocab_size is not None:
            if tokenizer_vocab is not None and self.vocab_size < tokenizer_vocab:
                raise ConfigError(f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                                  f"{tokenizer_vocab} pieces ({tokenizer_name}); leave it unset")
            return self.vocab_size
        if tokenizer_vocab is None:
            raise ConfigError("model.vocab_size is not set and there is no --tokenizer-model to take it from")
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(tokenizer_vocab / multiple) * multiple)

    def validate(self) -> None:
        check_letters(self.pattern)
        for name in ("d_model", "d_state", "d_conv", "expand", "num_experts", "num_heads", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        self._validate_moe()
        if "A" in self.pattern and self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                              f"{self.num_heads}; pick num_heads that divides d_model")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"model.norm={self.norm!r}: use rmsnorm or layernorm")
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"model.expert_activation={self.expert_activation!r}: use gelu, relu or swiglu")
        unknown = set(self.mamba_moe_projections) - set(MAMBA_MOE_PROJECTIONS)
        if unknown:
            raise ConfigError(f"model.mamba_moe_projections has {sorted(unknown)}; "
                              f"choose from {list(MAMBA_MOE_PROJECTIONS)}")
        if self.mamba_moe_every not in (1, 2):
            raise ConfigError(f"model.mamba_moe_every={self.mamba_moe_every}: use 1 (every Mamba layer) "
                              "or 2 (every other one)")

    @property
    def has_moe(self) -> bool:
        return "E" in self.pattern or bool(self.mamba_moe_projections)

    def _validate_moe(self) -> None:
        """The routing options, in Megatron's flag names, each mistake one line with its fix."""
        if self.top_k > self.num_experts:
            raise ConfigError(f"--moe-router-topk {self.top_k} exceeds --num-experts {self.num_experts}; "
                              "choose top-k <= the number of experts")
        for key, value, choices in (("router_score_function", self.router_score_function, ROUTER_SCORE_FUNCTIONS),
                                    ("router_type", self.router_type, ROUTER_TYPES),
                                    ("router_load_balancing_type", self.router_load_balancing_type,
                                     LOAD_BALANCING_TYPES),
                                    ("token_drop_policy", self.token_drop_policy, TOKEN_DROP_POLICIES)):
            if value not in choices:
                raise ConfigError(f"model.{key}={value!r}: use {' | '.join(choices)}")
        for key in ("load_balancing_weight", "z_loss_weight", "router_bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0")
        if self.top_k == 1 and self.router_score_function == "softmax" and not self.router_pre_softmax:
            raise ConfigError("a softmax over one chosen expert is always 1 and trains no router: keep "
                              "--moe-router-pre-softmax with --moe-router-topk 1 (Megatron's rule)")
        if self.router_type == "expert_choice":
            if self.router_enable_expert_bias:
                raise ConfigError("--moe-router-enable-expert-bias balances token-choice routing; expert choice is "
                                  "balanced by construction: drop one of them")
            if self.router_force_load_balancing:
                raise ConfigError("--moe-router-force-load-balancing replaces the router's choice; it does not "
                                  "combine with model.router_type=expert_choice")
            if self.router_load_balancing_type != "none":
                raise ConfigError("expert choice gives every expert the same load: set "
                                  "--moe-router-load-balancing-type none with model.router_type=expert_choice")
            if not self.capacity_factor or self.capacity_factor <= 0:
                raise ConfigError("expert choice needs a capacity (tokens each expert takes): set "
                                  "--moe-expert-capacity-factor > 0")
        if self.router_enable_expert_bias and self.router_force_load_balancing:
            raise ConfigError("--moe-router-force-load-balancing ignores the router, so the expert bias would "
                              "do nothing: drop one of them")
        if self.shared_expert_intermediate_size is not None:
            if self.shared_expert_intermediate_size < 1:
                raise ConfigError(f"--moe-shared-expert-intermediate-size {self.shared_expert_intermediate_size} "
                                  "must be >= 1 (unset it for no shared expert)")
            if "E" not in self.pattern:
                raise ConfigError("--moe-shared-expert-intermediate-size adds a shared expert to E blocks, and "
                                  f"model.pattern={self.pattern!r} has none")
        if self.mamba_moe_dense_fallback and not self.mamba_moe_projections:
            raise ConfigError("model.mamba_moe_dense_fallback is for MoE projections: set "
                              "model.mamba_moe_projections too")

"""transformers' config of a megamoe model (MoE-Mamba, its variants, the attention baselines), shipped as remote
code with megamoe's `--format hf` exports. It holds megamoe's `model:` section under megamoe's own names, with the
layer pattern resolved into one entry per block, so the modeling file never needs megamoe's rules."""
from transformers import PretrainedConfig


class MegaMoEConfig(PretrainedConfig):
    """block_types: one per block, "M" Mamba, "E" Switch MoE, "A" attention (RoPE), "F" dense FFN, "ME" Parallel
    MoE-Mamba; layer_mamba_moe_projections: per block, the Mamba projections (conv, gate, output) that are MoEs;
    moe_top_k: experts per token (not `top_k`, which transformers would read as a sampling setting); router_*,
    shared_expert_intermediate_size, mamba_moe_dense_fallback: megamoe's routing keys (their defaults: Switch)."""

    model_type = "megamoe"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "num_heads"}

    def __init__(self, vocab_size=256, d_model=64, block_types=("M", "E"), layer_mamba_moe_projections=None,
                 d_state=16, d_conv=4, d_inner=128, dt_rank=4, conv_bias=True, proj_bias=False, num_experts=8,
                 d_expert=192, moe_top_k=1, expert_activation="gelu", load_balancing_weight=0.01, num_heads=8,
                 d_ffn=256, rope_base=10000.0, norm="rmsnorm", norm_eps=1e-5, init_std=0.02,
                 tie_word_embeddings=True, use_cache=True, router_score_function="softmax", router_pre_softmax=True,
                 router_renormalize=None, router_enable_expert_bias=False, shared_expert_intermediate_size=None,
                 mamba_moe_dense_fallback=False, **kwargs):
        self.vocab_size, self.d_model, self.block_types = vocab_size, d_model, list(block_types)
        self.layer_mamba_moe_projections = [list(p) for p in (layer_mamba_moe_projections
                                                              or [[] for _ in self.block_types])]
        self.d_state, self.d_conv, self.d_inner, self.dt_rank = d_state, d_conv, d_inner, dt_rank
        self.conv_bias, self.proj_bias = conv_bias, proj_bias
        self.num_experts, self.d_expert, self.moe_top_k = num_experts, d_expert, moe_top_k
        self.expert_activation, self.load_balancing_weight = expert_activation, load_balancing_weight
        self.num_heads, self.d_ffn, self.rope_base = num_heads, d_ffn, rope_base
        self.norm, self.norm_eps, self.init_std, self.use_cache = norm, norm_eps, init_std, use_cache
        self.router_score_function, self.router_pre_softmax = router_score_function, router_pre_softmax
        self.router_renormalize, self.router_enable_expert_bias = router_renormalize, router_enable_expert_bias
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.mamba_moe_dense_fallback = mamba_moe_dense_fallback
        self.num_hidden_layers = len(self.block_types)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

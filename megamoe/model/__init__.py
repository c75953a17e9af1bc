"""The model, plain PyTorch with no ranks in it: Mamba-1 mixer, Switch MoE and its router, attention, FFN, the LM."""
from megamoe.model.attention import Attention, FeedForward, KVCache
from megamoe.model.lm import (
    Block,
    LMOutput,
    MambaLM,
    MoETotals,
    RMSNorm,
    active_parameters,
    build_model,
    count_parameters,
    cross_entropy,
    masked_mean,
    meta_model,
    moe_layer_names,
    moe_summary,
    routing_of,
    stream_seed,
)
from megamoe.model.mamba import MambaMixer
from megamoe.model.moe import (
    Experts,
    LocalDispatcher,
    SwitchMoE,
    attach_aux_loss,
    aux_loss_scale,
    grouped_gemm_supported,
    moe_capacity,
)
from megamoe.model.router import Routing, SwitchRouter, load_balancing_loss

__all__ = ["Attention", "Block", "Experts", "FeedForward", "KVCache", "LMOutput", "LocalDispatcher", "MambaLM",
           "MambaMixer", "MoETotals", "RMSNorm", "Routing", "SwitchMoE", "SwitchRouter", "active_parameters",
           "attach_aux_loss", "aux_loss_scale", "build_model", "count_parameters", "cross_entropy",
           "grouped_gemm_supported", "load_balancing_loss", "masked_mean", "meta_model", "moe_capacity",
           "moe_layer_names", "moe_summary", "routing_of", "stream_seed"]

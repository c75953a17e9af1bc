"""The model, plain PyTorch with no ranks in it: Mamba-1 mixer, Switch MoE, attention, FFN, the LM."""
from megamoe.model.attention import Attention, FeedForward
from megamoe.model.lm import Block, LMOutput, MambaLM, RMSNorm, block_kinds, build_model, count_parameters
from megamoe.model.mamba import MambaMixer
from megamoe.model.moe import (Experts, SwitchMoE, SwitchRouter, attach_aux_loss, aux_loss_scale,
                               load_balancing_loss)

__all__ = ["Attention", "Block", "Experts", "FeedForward", "LMOutput", "MambaLM", "MambaMixer", "RMSNorm",
           "SwitchMoE", "SwitchRouter", "attach_aux_loss", "aux_loss_scale", "block_kinds", "build_model",
           "count_parameters", "load_balancing_loss"]

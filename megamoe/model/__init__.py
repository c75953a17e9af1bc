"""The model, plain PyTorch with no ranks in it: Mamba-1 mixer, Switch MoE, attention, FFN, the LM."""
from megamoe.model.attention import Attention, FeedForward
from megamoe.model.lm import Block, LMOutput, MambaLM, RMSNorm, block_kinds, build_model, count_parameters
from megamoe.model.mamba import MambaMixer
from megamoe.model.moe import (Experts, SwitchMoE, SwitchRouter, attach_aux_loss, load_balancing_loss,
                               set_aux_loss_scale)

__all__ = ["Attention", "Block", "Experts", "FeedForward", "LMOutput", "MambaLM", "MambaMixer", "RMSNorm",
           "SwitchMoE", "SwitchRouter", "attach_aux_loss", "block_kinds", "build_model", "count_parameters",
           "load_balancing_loss", "set_aux_loss_scale"]

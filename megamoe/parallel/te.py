"""GPU fast paths, used when importable and falling back cleanly otherwise:

- Transformer Engine linears (column / row parallel over the TP group, or plain) in place of megatron-core's
  or torch's, so `training.fp8` can run the GEMMs in FP8 under `te.fp8_autocast`;
- apex's fused RMSNorm / LayerNorm in place of the PyTorch norms;
- torch's grouped GEMM for the Switch experts (megamoe.model.moe.Experts), or a loop over them.

`fast_paths(cfg, device)` decides once; `describe()` is the start-up log line that says which path is active.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megamoe.config import Config, ConfigError
from megamoe.model import RMSNorm, grouped_gemm_supported
from megamoe.parallel.sharding import ShardSpec, set_shard_spec, take_shard


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass
class FastPaths:
    te: Optional[object] = None  # the transformer_engine.pytorch module, when its linears are used
    apex_norms: Optional[object] = None  # apex.normalization, when its fused norms are used
    grouped_gemm: bool = False  # experts in torch's grouped GEMM where their widths fit (Experts.grouped_fits)

    def describe(self) -> str:
        experts = "grouped GEMM (torch grouped_mm)" if self.grouped_gemm else "a loop over local experts"
        return (f"linears: {'Transformer Engine' if self.te else 'megatron-core / PyTorch'}; "
                f"norms: {'apex fused' if self.apex_norms else 'PyTorch'}; experts: {experts}")


def fast_paths(cfg: Config, device: torch.device) -> FastPaths:
    """Transformer Engine when configured (auto: on CUDA when importable), apex norms on CUDA when importable."""
    mode = cfg.training.transformer_engine
    te = None
    if mode == "on" or (mode == "auto" and device.type == "cuda"):
        te = _try_import("transformer_engine.pytorch")
        if te is None and mode == "on":
            raise ConfigError("training.transformer_engine=on, but Transformer Engine is not importable here; "
                              "install megamoe[gpu] or use the NGC container, or set it to auto or off")
    if te is not None and cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size > 1:
        raise ConfigError("--sequence-parallel with Transformer Engine linears is not supported (TE gathers "
                          "sequence-first tensors, megamoe's are batch-first); set training.transformer_engine "
                          "off or drop --sequence-parallel")
    if cfg.training.fp8 and te is None:
        raise ConfigError(f"training.fp8={cfg.training.fp8!r} needs Transformer Engine on CUDA; it is not in use "
                          "here (not importable, no CUDA device, or training.transformer_engine=off)")
    apex_norms = _try_import("apex.normalization") if device.type == "cuda" else None
    dtype = getattr(torch, cfg.training.autocast_dtype or "float32")
    return FastPaths(te, apex_norms, cfg.training.moe_grouped_gemm and grouped_gemm_supported(device, dtype))


def te_linear(linear: nn.Linear, topo, te, mode: Optional[str], partitions: tuple = ()) -> nn.Module:
    """A Transformer Engine Linear holding this rank's shard of `linear` (mode: None, "column" or "row")."""
    out_features, in_features = linear.weight.shape
    parallel = mode is not None and topo.tp > 1
    layer = te.Linear(in_features, out_features, bias=linear.bias is not None,
                      tp_group=topo.tp_group if parallel else None, tp_size=topo.tp if parallel else 1,
                      parallel_mode=mode if parallel else None, params_dtype=torch.float32, device=topo.device)
    weight_spec = ShardSpec(tuple(linear.weight.shape), {"column": 0, "row": 1}.get(mode) if parallel else None,
                            tuple(partitions))
    with torch.no_grad():
        layer.weight.copy_(take_shard(linear.weight.detach(), weight_spec, topo.tp_rank, topo.tp))
        if weight_spec.dim is not None:
            set_shard_spec(layer.weight, weight_spec)
        if linear.bias is not None:
            bias_spec = ShardSpec(tuple(linear.bias.shape), 0 if weight_spec.dim == 0 else None, tuple(partitions))
            layer.bias.copy_(take_shard(linear.bias.detach(), bias_spec, topo.tp_rank, topo.tp))
            if bias_spec.dim is not None:
                set_shard_spec(layer.bias, bias_spec)
    return layer


def fused_norm(norm: nn.Module, apex_norms) -> nn.Module:
    """apex's fused version of an RMSNorm / LayerNorm, with the same weights (and parameter names)."""
    dim = norm.weight.shape[0]
    if isinstance(norm, RMSNorm):
        fused = apex_norms.FusedRMSNorm(dim, eps=norm.eps)
    else:
        fused = apex_norms.FusedLayerNorm(dim, eps=norm.eps)
    fused.load_state_dict(norm.state_dict())
    return fused


@functools.lru_cache(maxsize=None)
def _fp8_recipe(fp8: str, kind: str, amax_history_len: int, margin: int):
    """The Transformer Engine recipe, built once per setting: every step's fp8_autocast gets the same object."""
    recipes = _try_import("transformer_engine.common.recipe")
    if recipes is None:
        raise ConfigError(f"training.fp8={fp8!r} needs Transformer Engine, which is not importable here; install "
                          "megamoe[gpu] (or use the NGC container) or unset training.fp8")
    fmt = recipes.Format.HYBRID if fp8 == "hybrid" else recipes.Format.E4M3
    if kind == "current":
        if not hasattr(recipes, "Float8CurrentScaling"):
            raise ConfigError("training.fp8_recipe=current needs Transformer Engine >= 2.2; use delayed")
        return recipes.Float8CurrentScaling(fp8_format=fmt)
    return recipes.DelayedScaling(fp8_format=fmt, amax_history_len=amax_history_len, margin=margin,
                                  amax_compute_algo="max")


def fp8_context(cfg: Config, topo=None):
    """te.fp8_autocast with the configured recipe, or nothing when training.fp8 is unset."""
    t = cfg.training
    if not t.fp8:
        return contextlib.nullcontext()
    recipe = _fp8_recipe(t.fp8, t.fp8_recipe, t.fp8_amax_history_len, t.fp8_margin)
    # Amaxes are reduced over this stage's TP x DP ranks, as megatron-core does: TE's default group, the whole
    # world, would mix different pipeline stages' layers.
    group = topo.amax_group if topo is not None else None
    return _try_import("transformer_engine.pytorch").fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)

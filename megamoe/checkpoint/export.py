"""Export a checkpoint (any layout) to single-process formats, offline on CPU:

    consolidate(ckpt, out)       out/model.safetensors (global names, whole tensors) + out/config.yaml
    load_consolidated(out)       -> (MambaLM, Config), the unsharded model
    export_hf(ckpt, out)         a folder transformers.MambaForCausalLM.from_pretrained loads (Mamba-only models)

HF's Mamba is a stack of pre-norm Mamba-1 blocks with RMSNorm, exactly megamoe's pattern "MM...M", under
the names backbone.embeddings, backbone.layers.<i>.{norm, mixer.*}, backbone.norm_f, lm_head. The mixer's
parameter names are the same as megamoe's. Anything else (MoE, attention, LayerNorm, a d_inner that is not
expand x d_model) has no HF Mamba equivalent and is refused with the reason.
"""
from __future__ import annotations

import json
import os

import yaml
from safetensors.torch import load_file, save_file

from megamoe.checkpoint.convert import read_tensors
from megamoe.checkpoint.folder import load_config, read_marker, resolve
from megamoe.config import Config, ModelConfig, config_from_dict
from megamoe.errors import CheckpointError
from megamoe.model import build_model

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"


def _save_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def consolidate(path: str, output: str) -> str:
    """Whole model tensors of checkpoint `path` in one safetensors file, plus the resolved config."""
    path = resolve(path)
    marker = read_marker(path)
    tensors = read_tensors(path)
    os.makedirs(output, exist_ok=True)
    _save_safetensors(tensors, os.path.join(output, MODEL_FILE),
                      {"format": "pt", "step": str(marker["step"]), "source": os.path.abspath(path)})
    with open(os.path.join(output, CONFIG_FILE), "w") as f:
        f.write(load_config(path).to_yaml())
    return output


def load_consolidated(folder: str):
    """(MambaLM on CPU, Config) from a folder `consolidate` wrote."""
    for name in (MODEL_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{os.path.join(folder, name)} is missing; write the folder with "
                                  "tools/convert_checkpoint.py --format consolidated")
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    tensors = load_file(os.path.join(folder, MODEL_FILE))
    model = build_model(cfg.model, seed=cfg.training.seed)
    if cfg.model.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embedding.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{os.path.join(folder, MODEL_FILE)} does not fit its config: missing {missing}, "
                              f"unexpected {unexpected}")
    return model, cfg


def hf_unsupported(model: ModelConfig) -> list:
    """Why `model` has no transformers MambaForCausalLM equivalent (empty when it has one)."""
    reasons = []
    other = sorted(set(model.pattern.replace("|", "")) - {"M"})
    if other:
        reasons.append(f"model.pattern={model.pattern!r} has layers {other} (MoE, attention or FFN); HF's "
                       "MambaForCausalLM holds Mamba layers only (export a pattern of M alone, or use "
                       "--format consolidated)")
    if model.mamba_moe_projections:
        reasons.append("model.mamba_moe_projections puts MoE inside the Mamba projections, which HF's MambaMixer "
                       "does not have")
    if model.norm != "rmsnorm":
        reasons.append(f"model.norm={model.norm!r}: HF's Mamba uses RMSNorm")
    if model.d_inner % model.d_model:
        reasons.append(f"d_inner={model.d_inner} is not a multiple of d_model={model.d_model}; HF derives "
                       "intermediate_size = expand x hidden_size with an integer expand")
    return reasons


def hf_config(model: ModelConfig) -> dict:
    """config.json of transformers' MambaConfig for `model`."""
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba",
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "state_size": model.d_state,
        "num_hidden_layers": len(model.pattern.replace("|", "")), "expand": model.d_inner // model.d_model,
        "intermediate_size": model.d_inner, "conv_kernel": model.d_conv, "time_step_rank": model.resolved_dt_rank,
        "time_step_min": model.dt_min, "time_step_max": model.dt_max, "time_step_floor": model.dt_init_floor,
        "use_bias": model.proj_bias, "use_conv_bias": model.conv_bias, "layer_norm_epsilon": model.norm_eps,
        "hidden_act": "silu", "residual_in_fp32": True, "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std, "dtype": "float32",
    }


def hf_names(tensors: dict, model: ModelConfig) -> dict:
    """megamoe's global names -> HF MambaForCausalLM's."""
    out = {}
    for name, t in tensors.items():
        if name == "embedding.weight":
            out["backbone.embeddings.weight"] = t
        elif name.startswith(("layers.", "norm_f.")):
            out["backbone." + name] = t
        elif name == "lm_head.weight":
            if not model.tie_embeddings:
                out[name] = t
        else:
            raise CheckpointError(f"tensor {name} has no place in HF's MambaForCausalLM")
    return out


def export_hf(path: str, output: str) -> str:
    """Write config.json + model.safetensors that transformers.MambaForCausalLM.from_pretrained loads."""
    path = resolve(path)
    cfg: Config = load_config(path)
    reasons = hf_unsupported(cfg.model)
    if reasons:
        raise CheckpointError(f"{path} cannot be exported to HF transformers: " + "; ".join(reasons))
    tensors = hf_names(read_tensors(path), cfg.model)
    os.makedirs(output, exist_ok=True)
    _save_safetensors(tensors, os.path.join(output, MODEL_FILE), {"format": "pt"})
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf_config(cfg.model), f, indent=2)
    return output

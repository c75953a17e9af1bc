"""Export a checkpoint (any layout) to one safetensors file, offline on CPU (Hugging Face folders: hf_export.py):

    consolidate(ckpt, out)       out/model.safetensors (global names, whole tensors) + out/config.yaml
    load_consolidated(out)       -> (MambaLM, Config), the unsharded model
"""
from __future__ import annotations

import os

import yaml
from safetensors.torch import load_file, save_file

from megamoe.checkpoint.convert import read_tensors
from megamoe.checkpoint.folder import load_config, read_marker, resolve
from megamoe.config import config_from_dict
from megamoe.errors import CheckpointError
from megamoe.model import build_model

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"


def save_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def consolidate(path: str, output: str) -> str:
    """Whole model tensors of checkpoint `path` in one safetensors file, plus the resolved config."""
    path = resolve(path)
    marker = read_marker(path)
    tensors = read_tensors(path)
    os.makedirs(output, exist_ok=True)
    save_safetensors(tensors, os.path.join(output, MODEL_FILE),
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

"""Import a Hugging Face transformers folder as a megamoe checkpoint, in any layout, offline on CPU:

    import_hf(folder, output, tp=1, pp=1, ep=1, etp=None, dp=None, model_overrides=None) -> output/iter_0000000

Two kinds of folder are read: transformers' MambaForCausalLM (the layout of the public state-spaces Mamba
checkpoints: config.json with model_type "mamba"; weights in model.safetensors, sharded safetensors with their
index, or pytorch_model.bin), which becomes a megamoe pattern of M blocks, and megamoe's own exports (hf_export.py),
which come back as they were saved (config.json's megamoe_model). A sentencepiece tokenizer.model beside the
weights goes into the checkpoint, and its config names it.

`model_overrides` ({model key: value}) changes the model section, e.g. upcycling: {"pattern": "MEMEME"} puts the
source's Mamba layers into the M blocks of the new pattern, in order, and initialises the rest (MoE, attention,
FFN) from the seed, as training would. The checkpoint holds weights alone (step 0, no optimizer state): train from
it with `--load OUT --finetune`, with the model section of its config.yaml.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Optional

import torch
from safetensors.torch import load_file

from megamoe.checkpoint.convert import layout_config, write_layout
from megamoe.checkpoint.folder import FORMAT_VERSION
from megamoe.checkpoint.hf_export import TOKENIZER_FILE, megamoe_names
from megamoe.config import Config, ModelConfig, apply_dict, block_kinds
from megamoe.errors import CheckpointError, ConfigError
from megamoe.model import build_model, meta_model


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); give a transformers model folder") from None


def read_hf_weights(folder: str) -> dict:
    """{HF name: tensor} of a transformers folder: model.safetensors, its shards (by the index), or
    pytorch_model.bin."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder} holds no weights (model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin); give the folder save_pretrained wrote")


def mamba_model_config(hf: dict, where: str) -> dict:
    """megamoe's model section for transformers' MambaConfig `hf` (config.json as a dict)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r}; megamoe's Mamba uses silu")
    d_model = hf["hidden_size"]
    d_inner = hf.get("intermediate_size") or int(hf.get("expand", 2) * d_model)
    rank = hf.get("time_step_rank", "auto")
    return dict(pattern="M" * hf["num_hidden_layers"], d_model=d_model, vocab_size=hf["vocab_size"],
                d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), mamba_d_inner=d_inner,
                dt_rank=None if rank == "auto" else int(rank), dt_min=hf.get("time_step_min", 0.001),
                dt_max=hf.get("time_step_max", 0.1), dt_init_floor=hf.get("time_step_floor", 1e-4),
                conv_bias=hf.get("use_conv_bias", True), proj_bias=hf.get("use_bias", False),
                norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02))


def _model_source(folder: str, hf: dict) -> dict:
    """The model section the folder was made from: megamoe's own exports record it; transformers' Mamba implies it."""
    if "megamoe_model" in hf:  # megamoe's exports, either kind: exactly what was exported
        return dict(hf["megamoe_model"])
    if hf.get("model_type") == "mamba":
        return mamba_model_config(hf, folder)
    raise CheckpointError(f"{folder}/config.json has model_type {hf.get('model_type')!r}; megamoe imports "
                          "transformers' MambaForCausalLM folders and its own HF exports")


def _config(model: dict, where: str) -> Config:
    """A default Config with this model section, checked."""
    cfg = Config()
    try:
        apply_dict(cfg, {"model": model}, where)
        cfg.model.validate()
    except ConfigError as e:
        raise CheckpointError(f"importing {where}: {e}") from None
    return cfg


def _mamba_renames(source: ModelConfig, target: ModelConfig) -> dict:
    """{source block index: target block index}: the source's Mamba blocks into the target's, in order."""
    src = [i for i, b in meta_model(source).layers.items() if hasattr(b, "mixer")]
    dst = [i for i, b in meta_model(target).layers.items() if hasattr(b, "mixer")]
    if len(src) != len(dst):
        raise CheckpointError(f"the new pattern {target.pattern!r} has {len(dst)} Mamba layers, the source "
                              f"{len(src)}; give a pattern with {len(src)} M")
    return dict(zip(src, dst))


def _place(tensors: dict, source: ModelConfig, cfg: Config) -> dict:
    """The source's tensors under the target model's names, the target's other tensors fresh from the seed."""
    same = block_kinds(source) == block_kinds(cfg.model)
    renames = None if same else _mamba_renames(source, cfg.model)
    placed = {}
    for name, t in tensors.items():
        match = re.match(r"layers\.(\d+)\.(.*)", name)
        if renames is not None and match:
            if match.group(1) not in renames:
                raise CheckpointError(f"{name}: only the Mamba layers of the source can go into a new pattern")
            name = f"layers.{renames[match.group(1)]}.{match.group(2)}"
        placed[name] = t.float()
    if cfg.model.tie_embeddings:
        placed.pop("lm_head.weight", None)
    shapes = {n: tuple(p.shape) for n, p in meta_model(cfg.model).state_dict().items()
              if not (cfg.model.tie_embeddings and n == "lm_head.weight")}
    unknown = sorted(set(placed) - set(shapes))
    wrong = [f"{n}: {tuple(placed[n].shape)} vs the model's {shapes[n]}" for n in placed
             if n in shapes and tuple(placed[n].shape) != shapes[n]]
    if unknown or wrong:
        raise CheckpointError(f"the HF weights do not fit the model: unexpected {unknown[:4]}, shapes {wrong[:4]}")
    missing = sorted(set(shapes) - set(placed))
    if missing and renames is None:
        raise CheckpointError(f"the HF folder lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if missing:  # upcycling: the new layers as a training run would initialise them
        fresh = build_model(cfg.model, seed=cfg.training.seed).state_dict()
        placed.update({n: fresh[n].detach().clone() for n in missing})
    return placed


def import_hf(folder: str, output: str, tp: int = 1, pp: int = 1, ep: int = 1, etp=None, dp=None,
              model_overrides: Optional[dict] = None) -> str:
    """Write the megamoe checkpoint of HF folder `folder` as output/iter_0000000, stored in the TP/PP/EP layout
    given (it loads into any); returns its folder."""
    hf = _read_json(os.path.join(folder, "config.json"))
    source = _model_source(folder, hf)
    cfg = _config({**source, **(model_overrides or {})}, folder)
    tokenizer = os.path.join(folder, TOKENIZER_FILE)
    files = [tokenizer] if os.path.isfile(tokenizer) else []
    final = os.path.join(os.path.abspath(output), "iter_0000000")
    if files:
        cfg.data.tokenizer_model = os.path.join(final, TOKENIZER_FILE)
    cfg, dp = layout_config(cfg, folder, tp, pp, ep, etp, dp)
    native = hf.get("model_type") == "mamba"  # MambaForCausalLM's names, else MegaMoEForCausalLM's
    tensors = _place(megamoe_names(read_hf_weights(folder), native), _config(source, folder).model, cfg)
    marker = dict(format_version=FORMAT_VERSION, step=0, train_state={"step": 0, "consumed_train_samples": 0},
                  model=dataclasses.asdict(cfg.model), optimizer=False, optimizer_groups=[],
                  saved_at=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                  converted_from=dict(path=os.path.abspath(folder), format=f"hf {hf.get('model_type')}"))
    return write_layout(output, cfg, tensors, {}, marker, dp, files, {"config.yaml": cfg.to_yaml()})

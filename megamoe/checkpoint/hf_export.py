"""Export a checkpoint (any layout) to a Hugging Face transformers folder, offline on CPU:

    export_hf(ckpt, out, tokenizer_model=None) -> out

Mamba-only models (a pattern of M, RMSNorm, d_inner = an integer expand x d_model) become transformers' own
MambaForCausalLM: the same blocks under backbone.embeddings, backbone.layers.<i>.{norm, mixer.*}, backbone.norm_f.
Every other model (MoE-Mamba, Parallel MoE-Mamba, MoE in the Mamba projections, the attention baselines, mixed
patterns) has no transformers class (Jamba cannot hold it) and becomes MegaMoEForCausalLM, megamoe's model as
remote code: config.json with auto_map, the self-contained configuration_/modeling_megamoe.py of hf_modeling/
(plain PyTorch and transformers, no megamoe import), model.safetensors under megamoe's own names behind "model.".

Both carry the tokenizer of the checkpoint's config, for AutoTokenizer: a sentencepiece model as tokenizer.model
with tokenization_megamoe.py (trust_remote_code); a Hugging Face one (--tokenizer-type HuggingFaceTokenizer) as
its own tokenizer.json, read by transformers' PreTrainedTokenizerFast. And generation_config.json: EOD as eos,
and the padded vocabulary beyond the tokenizer suppressed, as tools/generate.py does, so greedy decoding matches
it. config.json keeps megamoe's model section under "megamoe_model", which hf_import.py reads back.

MoE routing exports with its options (softmax or sigmoid scores, pre- or post-softmax top-k, renormalisation, the
expert bias buffers, shared experts, the dense fallback's weights, which never run without capacity); expert choice
(not causal) and forced load balancing (ignores the router) are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

from megamoe.checkpoint.convert import read_tensors
from megamoe.checkpoint.export import MODEL_FILE, save_safetensors
from megamoe.checkpoint.folder import load_config, resolve
from megamoe.config import ModelConfig, block_kinds
from megamoe.data import HuggingFaceTokenizer, load_tokenizer
from megamoe.errors import CheckpointError
from megamoe.logging import get_logger
from megamoe.model import meta_model

HF_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
MODELING_FILES = ("configuration_megamoe.py", "modeling_megamoe.py")
TOKENIZER_CODE, TOKENIZER_FILE = "tokenization_megamoe.py", "tokenizer.model"
PREFIX = "model."  # MegaMoEForCausalLM's base model

log = get_logger()


def hf_unsupported(model: ModelConfig) -> list:
    """Why `model` has no transformers MambaForCausalLM equivalent (empty when it has one)."""
    reasons = []
    other = sorted(set(model.pattern.replace("|", "")) - {"M"})
    if other:
        reasons.append(f"model.pattern={model.pattern!r} has layers {other} (MoE, attention or FFN); HF's "
                       "MambaForCausalLM holds Mamba layers only")
    if model.mamba_moe_projections:
        reasons.append("model.mamba_moe_projections puts MoE inside the Mamba projections, which HF's MambaMixer "
                       "does not have")
    if model.norm != "rmsnorm":
        reasons.append(f"model.norm={model.norm!r}: HF's Mamba uses RMSNorm")
    if model.d_inner % model.d_model:
        reasons.append(f"d_inner={model.d_inner} is not a multiple of d_model={model.d_model}; HF derives "
                       "intermediate_size = expand x hidden_size with an integer expand")
    return reasons


def mamba_config(model: ModelConfig) -> dict:
    """config.json of transformers' MambaConfig for a Mamba-only `model`."""
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


def megamoe_config(model: ModelConfig) -> dict:
    """config.json of MegaMoEConfig (hf_modeling/configuration_megamoe.py) for `model`: the pattern resolved into
    blocks, and which Mamba projections are MoEs read off the model itself (megamoe.model's rule, not a copy)."""
    built = meta_model(model)
    projections = [list(b.mixer.moe_projections) if hasattr(b, "mixer") else [] for b in built.layers.values()]
    return {
        "architectures": ["MegaMoEForCausalLM"], "model_type": "megamoe",
        "auto_map": {"AutoConfig": "configuration_megamoe.MegaMoEConfig",
                     "AutoModelForCausalLM": "modeling_megamoe.MegaMoEForCausalLM"},
        "vocab_size": model.vocab_size, "d_model": model.d_model, "block_types": block_kinds(model),
        "layer_mamba_moe_projections": projections, "d_state": model.d_state, "d_conv": model.d_conv,
        "d_inner": model.d_inner, "dt_rank": model.resolved_dt_rank, "conv_bias": model.conv_bias,
        "proj_bias": model.proj_bias, "num_experts": model.num_experts, "d_expert": model.resolved_d_expert,
        "moe_top_k": model.top_k, "expert_activation": model.expert_activation,
        "load_balancing_weight": model.load_balancing_weight, "num_heads": model.num_heads,
        "d_ffn": model.resolved_d_ffn, "rope_base": model.rope_base, "norm": model.norm, "norm_eps": model.norm_eps,
        "init_std": model.init_std, "tie_word_embeddings": model.tie_embeddings, "use_cache": True,
        "router_score_function": model.router_score_function, "router_pre_softmax": model.router_pre_softmax,
        "router_renormalize": model.router_renormalize, "router_enable_expert_bias": model.router_enable_expert_bias,
        "shared_expert_intermediate_size": model.shared_expert_intermediate_size,
        "mamba_moe_dense_fallback": model.mamba_moe_dense_fallback, "dtype": "float32",
    }


def check_hf_routing(model: ModelConfig) -> None:
    """CheckpointError for the routing options MegaMoEForCausalLM cannot run (the others export as they are)."""
    if "E" not in model.pattern and not model.mamba_moe_projections:
        return  # no MoE layer: the routing keys do nothing
    if model.router_type == "expert_choice":
        raise CheckpointError("model.router_type=expert_choice cannot be exported to HF: each expert picks its "
                              "tokens from the whole batch, which is not causal (generation cannot run it); "
                              "evaluate it with megamoe's tools, or train with model.router_type=token_choice")
    if model.router_force_load_balancing:
        raise CheckpointError("model.router_force_load_balancing cannot be exported to HF: it deals tokens to "
                              "experts ignoring the router (throughput planning only); train without it "
                              "to export a model")


def hf_names(tensors: dict, model: ModelConfig, native: bool) -> dict:
    """megamoe's global names -> MambaForCausalLM's (native) or MegaMoEForCausalLM's."""
    out = {}
    for name, t in tensors.items():
        if name == "lm_head.weight":
            if not model.tie_embeddings:
                out[name] = t
        elif not native:
            out[PREFIX + name] = t
        elif name == "embedding.weight":
            out["backbone.embeddings.weight"] = t
        elif name.startswith(("layers.", "norm_f.")):
            out["backbone." + name] = t
        else:
            raise CheckpointError(f"tensor {name} has no place in HF's MambaForCausalLM")
    return out


def megamoe_names(tensors: dict, native: bool) -> dict:
    """hf_names reversed: MambaForCausalLM's names (also the older `backbone.embedding`) or MegaMoEForCausalLM's
    -> megamoe's; CheckpointError for a tensor that has no place in megamoe."""
    out = {}
    for name, t in tensors.items():
        if name == "lm_head.weight":
            out[name] = t
        elif not native and name.startswith(PREFIX):
            out[name[len(PREFIX):]] = t
        elif native and name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
            out["embedding.weight"] = t
        elif native and name.startswith(("backbone.layers.", "backbone.norm_f.")):
            out[name[len("backbone."):]] = t
        else:
            raise CheckpointError(f"tensor {name} of the HF folder has no place in a megamoe model")
    return out


def _tokenizer(cfg, tokenizer_model: Optional[str]):
    """The tokenizer to ship: the one given, else the checkpoint's; None (with a warning) when it names none."""
    path = tokenizer_model or cfg.data.tokenizer_model
    kind = None if tokenizer_model else cfg.data.tokenizer_type  # a path given is told by what it is
    if not path:
        log.warning("the checkpoint's config names no tokenizer (trained on mock data?): exporting the model "
                    "without one; pass --tokenizer-model PATH to add it")
        return None
    if not tokenizer_model and not os.path.exists(path):
        raise CheckpointError(f"the checkpoint's tokenizer {path} does not exist here; pass --tokenizer-model PATH")
    tokenizer = load_tokenizer(path, kind)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"the tokenizer {path} has {tokenizer.vocab_size} pieces, more than the model's "
                              f"vocabulary of {cfg.model.vocab_size}: it is not the model's tokenizer")
    return tokenizer


def _write_tokenizer(output: str, tokenizer) -> dict:
    """tokenizer.model, its remote code and tokenizer_config.json; returns the special token ids for the configs."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return _write_hf_tokenizer(output, tokenizer)
    shutil.copyfile(tokenizer.path, os.path.join(output, TOKENIZER_FILE))
    shutil.copyfile(os.path.join(HF_CODE, TOKENIZER_CODE), os.path.join(output, TOKENIZER_CODE))
    with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "MegaMoETokenizer", "clean_up_tokenization_spaces": False,
                   "auto_map": {"AutoTokenizer": ["tokenization_megamoe.MegaMoETokenizer", None]}}, f, indent=2)
    ids = {"eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod}
    if tokenizer.bos >= 0:
        ids["bos_token_id"] = tokenizer.bos
    return ids


def _write_hf_tokenizer(output: str, tokenizer: HuggingFaceTokenizer) -> dict:
    """tokenizer.json as megamoe read it, and a tokenizer_config.json (the source folder's, when it has one) that
    names megamoe's EOD as eos, its pad, and PreTrainedTokenizerFast, which encodes and decodes as the `tokenizers`
    library does (a model-specific class could rebuild the tokenizer its own way)."""
    with open(os.path.join(output, "tokenizer.json"), "wb") as f:
        f.write(tokenizer.tokenizer_json)
    source = tokenizer.path if tokenizer.path and os.path.isdir(tokenizer.path) else None
    config = {}
    if source and os.path.isfile(os.path.join(source, "tokenizer_config.json")):
        with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    for key in ("auto_map", "tokenizer_file", "added_tokens_decoder"):
        config.pop(key, None)  # the remote code, paths and ids of the source, which tokenizer.json already holds
    config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=tokenizer.token(tokenizer.eod))
    config.setdefault("clean_up_tokenization_spaces", False)
    pad = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
    config["pad_token"] = tokenizer.token(pad)
    _write_json(os.path.join(output, "tokenizer_config.json"), config)
    ids = {"eos_token_id": tokenizer.eod, "pad_token_id": pad}
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if isinstance(bos, str) and tokenizer.hf.token_to_id(bos) is not None:
        ids["bos_token_id"] = tokenizer.hf.token_to_id(bos)
    return ids


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def export_hf(path: str, output: str, tokenizer_model: Optional[str] = None) -> str:
    """Write the Hugging Face folder of checkpoint `path` (see the module docstring); returns `output`."""
    path = resolve(path)
    cfg = load_config(path)
    model = cfg.model
    native = not hf_unsupported(model)
    if not native:
        check_hf_routing(model)
    tokenizer = _tokenizer(cfg, tokenizer_model)  # checked before anything is written
    tensors = hf_names(read_tensors(path), model, native)
    os.makedirs(output, exist_ok=True)
    save_safetensors(tensors, os.path.join(output, MODEL_FILE), {"format": "pt"})
    config = mamba_config(model) if native else megamoe_config(model)
    if not native:
        for name in MODELING_FILES:
            shutil.copyfile(os.path.join(HF_CODE, name), os.path.join(output, name))
    generation = {"do_sample": False}
    if tokenizer is not None:
        ids = _write_tokenizer(output, tokenizer)
        config.update(ids)
        generation.update(ids)
        if tokenizer.vocab_size < model.vocab_size:  # the padding of the vocabulary is never produced
            generation["suppress_tokens"] = list(range(tokenizer.vocab_size, model.vocab_size))
    config["megamoe_model"] = dataclasses.asdict(model)
    _write_json(os.path.join(output, "config.json"), config)
    _write_json(os.path.join(output, "generation_config.json"), generation)
    return output

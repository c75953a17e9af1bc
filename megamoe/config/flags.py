"""The command-line and YAML layer over the config dataclasses: merging, Megatron's flag names, --help-config.

Precedence: dataclass defaults < YAML file < command line. Every key is spelled `section.key`
(`--model.d_model 512`); Megatron's everyday flags are accepted as aliases (MEGATRON_FLAGS). --help-config is
built from each field's metadata (`option(default, help)`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
from typing import Any, Optional

import yaml

from megamoe.config.run import Config
from megamoe.errors import ConfigError

# Megatron-LM flag -> section.key
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--virtual-pipeline-model-parallel-size": "parallel.virtual_pipeline_model_parallel_size",
    "--expert-model-parallel-size": "parallel.expert_model_parallel_size",
    "--context-parallel-size": "parallel.context_parallel_size",
    "--expert-tensor-parallel-size": "parallel.expert_tensor_parallel_size",
    "--sequence-parallel": "parallel.sequence_parallel",
    "--use-distributed-optimizer": "parallel.distributed_optimizer",
    "--micro-batch-size": "training.micro_batch_size",
    "--global-batch-size": "training.global_batch_size",
    "--train-iters": "training.train_iters",
    "--seed": "training.seed",
    "--bf16": "training.bf16",
    "--fp16": "training.fp16",
    "--loss-scale": "training.loss_scale",
    "--initial-loss-scale": "training.initial_loss_scale",
    "--min-loss-scale": "training.min_loss_scale",
    "--loss-scale-window": "training.loss_scale_window",
    "--hysteresis": "training.hysteresis",
    "--moe-grouped-gemm": "training.moe_grouped_gemm",
    "--recompute-granularity": "training.recompute_granularity",
    "--recompute-method": "training.recompute_method",
    "--recompute-num-layers": "training.recompute_num_layers",
    "--exit-signal-handler": "training.exit_signal_handler",
    "--exit-duration-in-mins": "training.exit_duration_in_mins",
    "--exit-interval": "training.exit_interval",
    "--check-for-nan-in-loss-and-grad": "training.check_for_nan_in_loss_and_grad",
    "--check-for-spiky-loss": "training.check_for_spiky_loss",
    "--rerun-mode": "training.rerun_mode",
    "--eval-interval": "training.eval_interval",
    "--eval-iters": "training.eval_iters",
    "--seq-length": "data.seq_length",
    "--data-path": "data.data_path",
    "--split": "data.split",
    "--tokenizer-model": "data.tokenizer_model",
    "--tokenizer-type": "data.tokenizer_type",
    "--data-cache-path": "data.cache_path",
    "--reset-position-ids": "data.reset_position_ids",
    "--reset-attention-mask": "data.reset_attention_mask",
    "--eod-mask-loss": "data.eod_mask_loss",
    "--lr": "optimizer.lr",
    "--min-lr": "optimizer.min_lr",
    "--weight-decay": "optimizer.weight_decay",
    "--clip-grad": "optimizer.clip_grad",
    "--lr-warmup-fraction": "optimizer.lr_warmup_fraction",
    "--lr-warmup-iters": "optimizer.lr_warmup_iters",
    "--lr-decay-style": "optimizer.lr_decay_style",
    "--adam-beta1": "optimizer.adam_beta1",
    "--adam-beta2": "optimizer.adam_beta2",
    "--save": "checkpoint.save",
    "--load": "checkpoint.load",
    "--save-interval": "checkpoint.save_interval",
    "--async-save": "checkpoint.async_save",
    "--finetune": "checkpoint.finetune",
    "--no-load-optim": "checkpoint.no_load_optim",
    "--no-load-rng": "checkpoint.no_load_rng",
    "--distributed-timeout-minutes": "parallel.distributed_timeout_minutes",
    "--log-interval": "logging.log_interval",
    "--wandb-project": "logging.wandb_project",
    "--wandb-exp-name": "logging.wandb_exp_name",
    "--wandb-save-dir": "logging.wandb_save_dir",
    "--num-experts": "model.num_experts",
    "--moe-ffn-hidden-size": "model.d_expert",
    "--moe-router-topk": "model.top_k",
    "--moe-router-pre-softmax": "model.router_pre_softmax",
    "--moe-router-score-function": "model.router_score_function",
    "--moe-router-enable-expert-bias": "model.router_enable_expert_bias",
    "--moe-router-bias-update-rate": "model.router_bias_update_rate",
    "--moe-router-load-balancing-type": "model.router_load_balancing_type",
    "--moe-router-force-load-balancing": "model.router_force_load_balancing",
    "--moe-aux-loss-coeff": "model.load_balancing_weight",
    "--moe-z-loss-coeff": "model.z_loss_weight",
    "--moe-shared-expert-intermediate-size": "model.shared_expert_intermediate_size",
    "--moe-expert-capacity-factor": "model.capacity_factor",
    "--moe-token-drop-policy": "model.token_drop_policy",
    "--moe-per-layer-logging": "logging.moe_per_layer_logging",
    "--hidden-size": "model.d_model",
}


# Megatron-LM's flags that turn a default-on option off (they take no value)
MEGATRON_NEGATIONS = {
    "--no-check-for-nan-in-loss-and-grad": "training.check_for_nan_in_loss_and_grad",
}


def _fields(obj) -> dict:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg: Config) -> list:
    return [f"{s}.{k}" for s, sec in _fields(cfg).items() for k in _fields(getattr(cfg, s))]


def _unknown_key(key: str, cfg: Config, where: str) -> ConfigError:
    candidates = list(_fields(cfg)) + all_keys(cfg) + list(MEGATRON_FLAGS) + list(MEGATRON_NEGATIONS)
    close = difflib.get_close_matches(key, candidates, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `megamoe-train --help-config`"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Turn a YAML or command-line value into the field's type."""
    ann = annotation.replace("Optional[", "").rstrip("]") if annotation.startswith("Optional[") else annotation
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and annotation.startswith("Optional")):
        if not annotation.startswith("Optional"):
            raise ConfigError(f"{key} may not be empty")
        return None
    try:
        if ann == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if ann == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if ann == "float":
            return float(value)
        if ann == "str":
            return str(value)
        if ann == "list":
            return value.split() if isinstance(value, str) else [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {ann}") from None
    return value


def set_key(cfg: Config, key: str, value: Any, where: str = "the command line") -> None:
    section, _, name = key.partition(".")
    if section not in _fields(cfg) or name not in _fields(getattr(cfg, section)):
        raise _unknown_key(key, cfg, where)
    sec = getattr(cfg, section)
    annotation = _fields(sec)[name].type
    setattr(sec, name, _coerce(value, str(annotation), key))


def apply_dict(cfg: Config, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, parallel:, ...)")
    for section, values in data.items():
        if section not in _fields(cfg):
            raise _unknown_key(str(section), cfg, where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value, where)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None


def parse_overrides(argv: list, cfg: Config) -> None:
    """Apply `--section.key value`, `--section.key=value` and Megatron flags, in order."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --model.d_model 512")
        flag, eq, inline = arg.partition("=")
        if flag in MEGATRON_NEGATIONS and not eq:
            set_key(cfg, MEGATRON_NEGATIONS[flag], False)
            i += 1
            continue
        key = MEGATRON_FLAGS.get(flag) or flag[2:].replace("-", "_")
        section, _, name = key.partition(".")
        if section not in _fields(cfg) or name not in _fields(getattr(cfg, section)):
            raise _unknown_key(flag, cfg, "the command line")
        ann = str(_fields(getattr(cfg, section))[name].type)
        if eq:
            values = [inline]
            i += 1
        else:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        if ann == "list":
            set_key(cfg, key, values if not eq else inline.split())
        elif not values and ann == "bool":
            set_key(cfg, key, True)
        elif len(values) != 1:
            raise ConfigError(f"{flag} takes one value, got {values or 'none'}")
        else:
            set_key(cfg, key, values[0])


def build_config(config_path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults, then the YAML file, then command-line overrides."""
    cfg = Config()
    if config_path:
        apply_dict(cfg, load_yaml(config_path), config_path)
    parse_overrides(list(overrides or []), cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, data, "config dict")
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with model:, parallel:, data:, optimizer:, training:, "
                                         "checkpoint:, logging: sections")
    parser.add_argument("--help-config", action="store_true", help="list every config key and its default")


def describe_keys() -> str:
    """Every config key by section, with its default, its Megatron alias and what it means (--help-config)."""
    cfg = Config()
    lines = []
    aliases = {v: k for k, v in MEGATRON_FLAGS.items()}
    for section in _fields(cfg):
        sec = getattr(cfg, section)
        lines.append(f"{section}: {inspect.getdoc(type(sec)).splitlines()[0]}")
        for name, f in _fields(sec).items():
            key = f"{section}.{name}"
            alias = f"  (alias {aliases[key]})" if key in aliases else ""
            help_text = f.metadata.get("help")
            lines.append(f"  --{key} = {getattr(sec, name)!r}{alias}" + (f"  # {help_text}" if help_text else ""))
    return "\n".join(lines)

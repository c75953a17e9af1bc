"""Run configuration: one dataclass per concern, loaded from YAML, overridden from the command line.

Precedence: dataclass defaults < YAML file < command line. Every key is spelled `section.key`
(`--model.d_model 512`); Megatron's everyday flags are accepted as aliases (see MEGATRON_FLAGS).
`validate()` checks the whole config before any process-group work and raises ConfigError with
the key and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

LAYER_KINDS = {"M": "Mamba", "E": "Switch MoE", "A": "attention", "F": "dense FFN"}
MAMBA_MOE_PROJECTIONS = ("conv", "gate", "output")


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """Architecture. `pattern` lists the layers: M Mamba, E Switch MoE, A attention, F dense FFN."""

    pattern: str = "MEMEMEME"
    d_model: int = 256
    vocab_size: Optional[int] = None  # None: the tokenizer's size, padded to `make_vocab_size_divisible_by` x TP
    make_vocab_size_divisible_by: int = 128
    # Mamba-1 mixer (defaults of the reference layer)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mamba_d_inner: Optional[int] = None  # None: expand x d_model; set it for the paper's fractional expansions
    dt_rank: Optional[int] = None  # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False
    # Switch MoE
    num_experts: int = 8
    d_expert: Optional[int] = None  # None: 3 x d_model
    top_k: int = 1
    capacity_factor: float = 1.0  # <= 0: no capacity limit (no dropping)
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    expert_activation: str = "gelu"  # gelu | relu | swiglu
    # Paper variants
    parallel_moe: bool = False  # Parallel MoE-Mamba: Mamba and MoE read the same normed input
    mamba_moe_projections: list = field(default_factory=list)  # subset of conv, gate, output
    mamba_moe_every: int = 1  # 1: every Mamba layer, 2: every other one
    # Attention / dense FFN (baselines)
    num_heads: int = 8
    d_ffn: Optional[int] = None  # None: 4 x d_model
    rope_base: float = 10000.0
    # Common
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def d_inner(self) -> int:
        return self.mamba_d_inner or self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @property
    def resolved_d_expert(self) -> int:
        return self.d_expert or 3 * self.d_model

    @property
    def resolved_d_ffn(self) -> int:
        return self.d_ffn or 4 * self.d_model

    def validate(self) -> None:
        bad = sorted(set(self.pattern) - set(LAYER_KINDS) - {"|"})
        if not self.pattern or bad:
            raise ConfigError(
                f"model.pattern={self.pattern!r}: unknown layer letters {bad}; use only "
                + ", ".join(f"{k} ({v})" for k, v in LAYER_KINDS.items()))
        for name in ("d_model", "d_state", "d_conv", "expand", "num_experts", "num_heads", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}")
        if "A" in self.pattern and self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                              f"{self.num_heads}; pick num_heads that divides d_model")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"model.norm={self.norm!r}: use rmsnorm or layernorm")
        if self.expert_activation not in ("gelu", "relu", "swiglu"):
            raise ConfigError(f"model.expert_activation={self.expert_activation!r}: use gelu, relu or swiglu")
        unknown = set(self.mamba_moe_projections) - set(MAMBA_MOE_PROJECTIONS)
        if unknown:
            raise ConfigError(f"model.mamba_moe_projections has {sorted(unknown)}; "
                              f"choose from {list(MAMBA_MOE_PROJECTIONS)}")
        if self.mamba_moe_every not in (1, 2):
            raise ConfigError(f"model.mamba_moe_every={self.mamba_moe_every}: use 1 (every Mamba layer) "
                              "or 2 (every other one)")


@dataclass
class ParallelConfig:
    """Layout; data parallel size is what is left: world / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: same as TP (megatron-core's default)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | zero_bubble
    backend: str = "auto"  # auto (nccl with CUDA, gloo without) | nccl | gloo
    distributed_timeout_minutes: int = 30

    @property
    def resolved_etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def validate(self, world_size: int, model: ModelConfig) -> None:
        tp, pp, ep, etp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                           self.expert_model_parallel_size, self.resolved_etp)
        for flag, v in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                        ("expert-model-parallel-size", ep), ("expert-tensor-parallel-size", etp)):
            if v < 1:
                raise ConfigError(f"--{flag}={v} must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
                f"--pipeline-model-parallel-size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} "
                "processes or change the sizes")
        if world_size % (etp * ep * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
                f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp}); "
                f"the expert grid needs a multiple of {etp * ep * pp} processes")
        if model.d_inner % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size={tp} does not divide the Mamba d_inner = expand x d_model = "
                f"{model.d_inner}; choose a TP size that divides {model.d_inner}")
        if "A" in model.pattern and model.num_heads % tp:
            raise ConfigError(f"--tensor-model-parallel-size={tp} does not divide model.num_heads="
                              f"{model.num_heads}")
        if "F" in model.pattern and model.resolved_d_ffn % tp:
            raise ConfigError(f"--tensor-model-parallel-size={tp} does not divide model.d_ffn="
                              f"{model.resolved_d_ffn}")
        if model.vocab_size is not None and model.vocab_size % tp:
            raise ConfigError(f"--tensor-model-parallel-size={tp} does not divide model.vocab_size="
                              f"{model.vocab_size}; leave vocab_size unset to pad it automatically")
        if etp not in (1, tp):
            raise ConfigError(f"--expert-tensor-parallel-size={etp}: use 1 (whole experts) or the tensor-parallel "
                              f"size {tp} (experts split like the dense layers, the default)")
        if tp > 1 and model.mamba_moe_projections:
            raise ConfigError("model.mamba_moe_projections (MoE inside the Mamba projections) needs "
                              "--tensor-model-parallel-size 1; use --expert-model-parallel-size to spread experts")
        has_moe = "E" in model.pattern or model.mamba_moe_projections
        if has_moe and model.num_experts % ep:
            divisors = [d for d in range(1, model.num_experts + 1) if model.num_experts % d == 0]
            raise ConfigError(
                f"model.num_experts={model.num_experts} is not divisible by --expert-model-parallel-size="
                f"{ep}; expert-parallel sizes that work: {divisors}")
        if has_moe and model.resolved_d_expert % etp:
            raise ConfigError(f"--expert-tensor-parallel-size={etp} does not divide model.d_expert="
                              f"{model.resolved_d_expert}")
        if self.virtual_pipeline_model_parallel_size and self.virtual_pipeline_model_parallel_size > 1:
            if pp == 1:
                raise ConfigError("--virtual-pipeline-model-parallel-size needs "
                                  "--pipeline-model-parallel-size > 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r}: use auto, nccl or gloo")
        if self.pipeline_schedule not in ("1f1b", "interleaved_1f1b", "zero_bubble"):
            raise ConfigError(f"parallel.pipeline_schedule={self.pipeline_schedule!r}: use 1f1b, "
                              "interleaved_1f1b or zero_bubble")


@dataclass
class DataConfig:
    """Megatron indexed datasets. data_path: prefixes, optionally weighted: [0.7, a, 0.3, b]."""

    data_path: list = field(default_factory=list)
    split: str = "949,50,1"
    tokenizer_model: Optional[str] = None  # sentencepiece .model
    seq_length: int = 256
    num_workers: int = 0
    cache_path: Optional[str] = None  # dataset index cache; None: <data dir>/index_cache (or a temp dir)
    mock: bool = False  # random tokens, no files (for benchmarks and tests)

    def prefixes(self) -> list:
        """The dataset prefixes in data_path, without the blend weights."""
        return [p for p in self.data_path if not _is_number(p)]

    def validate(self) -> None:
        if self.seq_length < 1:
            raise ConfigError(f"--seq-length={self.seq_length} must be >= 1")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(_is_number(p) for p in parts) or sum(map(float, parts)) <= 0:
            raise ConfigError(f"--split={self.split!r}: give three weights for train,valid,test, e.g. 949,50,1")
        if self.mock:
            return
        if not self.data_path:
            raise ConfigError("no training data: set --data-path to the prefix of a preprocessed .bin/.idx "
                              "pair (tools/preprocess_data.py writes them), or data.mock: true")
        weights = [p for p in self.data_path if _is_number(p)]
        if weights and len(weights) != len(self.prefixes()):
            raise ConfigError(f"--data-path {self.data_path}: give either prefixes alone or weight prefix "
                              "pairs, e.g. --data-path 0.7 a 0.3 b")
        for prefix in self.prefixes():
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(f"--data-path: {prefix + ext} does not exist; give the prefix of the "
                                      "files tools/preprocess_data.py wrote (without .bin/.idx)")
        if not self.tokenizer_model:
            raise ConfigError("--tokenizer-model is not set; give the sentencepiece .model the data was "
                              "preprocessed with")
        if not os.path.isfile(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model: {self.tokenizer_model} does not exist")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to min_lr (the paper's schedule)."""

    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: 0.1 x lr
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 0.5
    lr_warmup_fraction: float = 0.01
    lr_warmup_iters: Optional[int] = None  # overrides lr_warmup_fraction
    lr_decay_style: str = "cosine"  # cosine | linear | constant

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr} must be > 0")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.lr_decay_style={self.lr_decay_style!r}: use cosine, linear or constant")
        if not 0 <= self.lr_warmup_fraction <= 1:
            raise ConfigError(f"optimizer.lr_warmup_fraction={self.lr_warmup_fraction} must be in [0, 1]")


@dataclass
class TrainingConfig:
    """Steps, batch sizes, precision (bf16, fp16, FP8), recompute, early exits, evaluation."""

    train_iters: int = 300
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False  # float16 autocast with loss scaling, for GPUs without bf16
    loss_scale: Optional[float] = None  # --fp16: a constant loss scale; None: dynamic, as below
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflowing steps before the scale halves
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine)
    fp8_recipe: str = "delayed"  # delayed (amax history) | current (per-tensor current scaling, TE >= 2.2)
    fp8_amax_history_len: int = 1024
    fp8_margin: int = 0
    transformer_engine: str = "auto"  # auto: TE linears on CUDA when importable | on | off
    moe_grouped_gemm: bool = True  # experts in one grouped GEMM (torch grouped_mm) where it runs; false: a loop
    recompute_granularity: Optional[str] = None  # full: keep each block's input only, recompute it in backward
    recompute_method: str = "uniform"  # uniform: every block | block: the first recompute_num_layers per stage
    recompute_num_layers: int = 1
    exit_signal_handler: bool = False  # on SIGTERM: finish the step, save (--save), exit cleanly
    exit_duration_in_mins: Optional[float] = None  # save and exit after this many minutes of training
    exit_interval: Optional[int] = None  # save and exit when the step is a multiple of this
    eval_interval: int = 100
    eval_iters: int = 10
    torch_threads: Optional[int] = None  # CPU threads per process; None: cores / local processes

    @property
    def autocast_dtype(self) -> Optional[str]:
        """The torch dtype name the model computes in under autocast (--bf16 / --fp16); None: fp32."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else None

    def _validate_fp16(self) -> None:
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are both set; choose one")
        if self.fp16 and self.fp8:
            raise ConfigError("training.fp8 runs with --bf16 here; drop --fp16")
        for flag, value in (("loss-scale", self.loss_scale), ("initial-loss-scale", self.initial_loss_scale),
                            ("min-loss-scale", self.min_loss_scale)):
            if value is not None and value <= 0:
                raise ConfigError(f"--{flag}={value} must be > 0")
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ConfigError(f"--loss-scale-window={self.loss_scale_window} and --hysteresis={self.hysteresis} "
                              "must be >= 1")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale={self.min_loss_scale:g} is above --initial-loss-scale="
                              f"{self.initial_loss_scale:g}; lower it or raise the initial scale")

    def _validate_recompute(self) -> None:
        if self.recompute_granularity is None:
            return
        if self.recompute_granularity != "full":
            raise ConfigError(f"--recompute-granularity={self.recompute_granularity!r}: use full (Megatron's "
                              "selective recompute targets the attention core, which Mamba blocks do not have)")
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"--recompute-method={self.recompute_method!r}: use uniform or block")
        if self.recompute_method == "uniform" and self.recompute_num_layers != 1:
            raise ConfigError(f"--recompute-method uniform --recompute-num-layers {self.recompute_num_layers}: "
                              "megamoe recomputes block by block, so uniform takes 1 (every block); use "
                              "--recompute-method block N to recompute the first N blocks of each pipeline stage")
        if self.recompute_num_layers < 0:
            raise ConfigError(f"--recompute-num-layers={self.recompute_num_layers} must be >= 0")
        if self.fp8:
            raise ConfigError("--recompute-granularity with training.fp8 is not supported: the recomputed forward "
                              "would run outside fp8_autocast; unset one of them")

    def validate(self, world_size: int, parallel: ParallelConfig) -> None:
        for flag, v in (("train-iters", self.train_iters), ("micro-batch-size", self.micro_batch_size),
                        ("global-batch-size", self.global_batch_size)):
            if v < 1:
                raise ConfigError(f"--{flag}={v} must be >= 1")
        dp = parallel.data_parallel_size(world_size)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size={self.global_batch_size} is not divisible by --micro-batch-size "
                f"({self.micro_batch_size}) x data-parallel size ({dp}) = {self.micro_batch_size * dp}; "
                f"use a multiple of {self.micro_batch_size * dp}")
        pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size or 1
        micro = self.global_batch_size // (self.micro_batch_size * dp)
        if pp > 1 and vpp == 1 and parallel.pipeline_schedule == "1f1b" and micro < pp:
            raise ConfigError(
                f"1F1B needs at least as many micro-batches per step as pipeline stages: --global-batch-size "
                f"{self.global_batch_size} / (--micro-batch-size {self.micro_batch_size} x DP {dp}) = {micro} < "
                f"--pipeline-model-parallel-size {pp}; raise the global batch or lower the micro batch")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"training.fp8={self.fp8!r}: use hybrid or e4m3, or leave it unset")
        if self.fp8_recipe not in ("delayed", "current"):
            raise ConfigError(f"training.fp8_recipe={self.fp8_recipe!r}: use delayed or current")
        if self.transformer_engine not in ("auto", "on", "off"):
            raise ConfigError(f"training.transformer_engine={self.transformer_engine!r}: use auto, on or off")
        self._validate_recompute()
        self._validate_fp16()
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"--exit-interval={self.exit_interval} must be >= 1")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ConfigError(f"--exit-duration-in-mins={self.exit_duration_in_mins} must be > 0")
        if self.fp8 and self.transformer_engine == "off":
            raise ConfigError("training.fp8 needs Transformer Engine linears; set training.transformer_engine to "
                              "auto or on, or unset training.fp8")


@dataclass
class CheckpointConfig:
    """Saving and resuming (Megatron's --save / --load)."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None  # None: only at the end of training
    keep_last: Optional[int] = None  # None: keep all
    finetune: bool = False  # --load the weights only: step 0, a new optimizer and schedule, the data from the start
    no_load_optim: bool = False  # resume (step, data, RNG) with a new optimizer: e.g. from a model-only checkpoint
    no_load_rng: bool = False  # resume without the checkpoint's random generators


@dataclass
class LoggingConfig:
    """Progress lines, metrics.jsonl, TensorBoard and the loss plot."""

    log_dir: Optional[str] = None  # metrics.jsonl, TensorBoard events, loss.png; None: checkpoint.save or ./runs
    log_interval: int = 10
    tensorboard: bool = True
    peak_tflops: Optional[float] = None  # per device, for model FLOPs utilisation


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int, check_files: bool = True) -> None:
        """Check everything a run needs before any process-group work."""
        self.model.validate()
        self.parallel.validate(world_size, self.model)
        if self.parallel.pipeline_model_parallel_size > 1:
            # The stages themselves: enough blocks, '|' marks that match PP x virtual stages.
            from megamoe.parallel.pipeline import stage_blocks
            stage_blocks(self)
        self.optimizer.validate()
        self.training.validate(world_size, self.parallel)
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and self.data.seq_length % tp:
            raise ConfigError(f"--sequence-parallel splits the sequence over TP: --seq-length {self.data.seq_length} "
                              f"is not divisible by --tensor-model-parallel-size {tp}")
        if self.training.fp8:
            self._validate_fp8_shapes()
        if check_files:
            self.data.validate()
        if self.checkpoint.load and not os.path.exists(self.checkpoint.load):
            raise ConfigError(f"--load: {self.checkpoint.load} does not exist")
        if self.checkpoint.finetune and not self.checkpoint.load:
            raise ConfigError("--finetune starts from the weights of a checkpoint: give --load DIR")
        t = self.training
        if (t.exit_signal_handler or t.exit_duration_in_mins) and not self.checkpoint.save:
            flag = "--exit-signal-handler" if t.exit_signal_handler else "--exit-duration-in-mins"
            raise ConfigError(f"{flag} stops the run early to resume it later: give --save DIR for its checkpoint")

    def _validate_fp8_shapes(self) -> None:
        """FP8 GEMMs in Transformer Engine need every matrix dimension a multiple of 16."""
        m, tp = self.model, self.parallel.tensor_model_parallel_size
        dims = {"model.d_model": m.d_model, "tokens per micro-batch (--micro-batch-size x --seq-length)":
                self.training.micro_batch_size * self.data.seq_length}
        if "M" in m.pattern:
            dims.update({"Mamba d_inner / TP": m.d_inner // tp, "model.dt_rank + 2 x model.d_state":
                         m.resolved_dt_rank + 2 * m.d_state})
        if "F" in m.pattern:
            dims["model.d_ffn / TP"] = m.resolved_d_ffn // tp
        for name, value in dims.items():
            if value % 16:
                raise ConfigError(f"training.fp8: {name} = {value} is not a multiple of 16, which FP8 GEMMs need; "
                                  "change it or train in bf16 (unset training.fp8)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Megatron-LM flag -> section.key
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--virtual-pipeline-model-parallel-size": "parallel.virtual_pipeline_model_parallel_size",
    "--expert-model-parallel-size": "parallel.expert_model_parallel_size",
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
    "--eval-interval": "training.eval_interval",
    "--eval-iters": "training.eval_iters",
    "--seq-length": "data.seq_length",
    "--data-path": "data.data_path",
    "--split": "data.split",
    "--tokenizer-model": "data.tokenizer_model",
    "--data-cache-path": "data.cache_path",
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
    "--finetune": "checkpoint.finetune",
    "--no-load-optim": "checkpoint.no_load_optim",
    "--no-load-rng": "checkpoint.no_load_rng",
    "--log-interval": "logging.log_interval",
    "--num-experts": "model.num_experts",
    "--hidden-size": "model.d_model",
}


def _is_number(s: Any) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def _fields(obj) -> dict:
    return {f.name: f for f in dataclasses.fields(obj)}


def _all_keys(cfg: Config) -> list:
    return [f"{s}.{k}" for s, sec in _fields(cfg).items() for k in _fields(getattr(cfg, s))]


def _unknown_key(key: str, cfg: Config, where: str) -> ConfigError:
    candidates = list(_fields(cfg)) + _all_keys(cfg) + list(MEGATRON_FLAGS)
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


def _field_comments(cls) -> dict:
    """Field name -> the comment after it in the dataclass's source: the keys' documentation."""
    lines = inspect.getsource(cls).splitlines()
    return {m.group(1): m.group(2) for m in (re.match(r"    (\w+): [^#]*#\s*(.+)$", line) for line in lines) if m}


def describe_keys() -> str:
    """Every config key by section, with its default, its Megatron alias and what it means (--help-config)."""
    cfg = Config()
    lines = []
    aliases = {v: k for k, v in MEGATRON_FLAGS.items()}
    for section in _fields(cfg):
        sec = getattr(cfg, section)
        lines.append(f"{section}: {inspect.getdoc(type(sec)).splitlines()[0]}")
        comments = _field_comments(type(sec))
        for name in _fields(sec):
            key = f"{section}.{name}"
            alias = f"  (alias {aliases[key]})" if key in aliases else ""
            comment = f"  # {comments[name]}" if name in comments else ""
            lines.append(f"  --{key} = {getattr(sec, name)!r}{alias}{comment}")
    return "\n".join(lines)


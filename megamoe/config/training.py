"""The optimizer (`optimizer:`) and training-loop (`training:`) configs: schedule, batches, precision, recompute,
early exits, evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megamoe.config.options import option
from megamoe.config.parallel import ParallelConfig
from megamoe.errors import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to min_lr (the paper's schedule)."""

    lr: float = option(1e-3, "peak learning rate")
    min_lr: Optional[float] = option(None, "None: 0.1 x lr")
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms, biases, A_log, D)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(0.5, "global gradient-norm clipping (0: off)")
    lr_warmup_fraction: float = option(0.01, "linear warmup over this fraction of train_iters")
    lr_warmup_iters: Optional[int] = option(None, "overrides lr_warmup_fraction")
    lr_decay_style: str = option("cosine", "cosine | linear | constant")

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

    train_iters: int = option(300, "optimizer steps of the whole run")
    micro_batch_size: int = option(4, "sequences per micro-batch and data-parallel rank")
    global_batch_size: int = option(8, "sequences per optimizer step, over all data-parallel ranks")
    seed: int = option(1234, "initialisation, data order and every random stream")
    bf16: bool = option(False, "bfloat16 autocast with fp32 master weights")
    fp16: bool = option(False, "float16 autocast with loss scaling, for GPUs without bf16")
    loss_scale: Optional[float] = option(None, "--fp16: a constant loss scale; None: dynamic, as below")
    initial_loss_scale: float = option(2.0 ** 32, "--fp16: the dynamic loss scale to start from")
    min_loss_scale: float = option(1.0, "--fp16: the dynamic loss scale never halves below this")
    loss_scale_window: int = option(1000, "steps without overflow before the scale doubles")
    hysteresis: int = option(2, "overflowing steps before the scale halves")
    fp8: Optional[str] = option(None, "None | hybrid | e4m3 (Transformer Engine)")
    fp8_recipe: str = option("delayed", "delayed (amax history) | current (per-tensor current scaling, TE >= 2.2)")
    fp8_amax_history_len: int = option(1024, "FP8 delayed scaling: amax history length")
    fp8_margin: int = option(0, "FP8 delayed scaling: margin of the scaling factor")
    transformer_engine: str = option("auto", "auto: TE linears on CUDA when importable | on | off")
    moe_grouped_gemm: bool = option(True, "experts in one grouped GEMM (torch grouped_mm) where it runs; false: a loop")
    recompute_granularity: Optional[str] = option(None, "full: keep each block's input only, recompute it in "
                                                        "backward")
    recompute_method: str = option("uniform", "uniform: every block | block: the first recompute_num_layers per "
                                              "stage")
    recompute_num_layers: int = option(1, "--recompute-method block: blocks recomputed per pipeline stage")
    exit_signal_handler: bool = option(False, "on SIGTERM: finish the step, save (--save), exit cleanly")
    exit_duration_in_mins: Optional[float] = option(None, "save and exit after this many minutes of training")
    exit_interval: Optional[int] = option(None, "save and exit when the step is a multiple of this")
    check_for_nan_in_loss_and_grad: bool = option(True, "a non-finite loss or gradient on any rank skips the step "
                                                        "(weights untouched) and is traced to its first module")
    max_nonfinite_skips: int = option(3, "consecutive non-finite steps skipped before the run stops (0: stop at "
                                         "the first)")
    check_for_spiky_loss: bool = option(False, "report a step whose loss exceeds spiky_loss_factor x the mean of "
                                               "the last 20 steps")
    spiky_loss_factor: float = option(10.0, "--check-for-spiky-loss: what counts as a spike")
    rerun_mode: str = option("disabled", "disabled | validate_results: re-run a spiky step once from the same "
                                         "state to tell a transient fault from a deterministic one")
    eval_interval: int = option(100, "steps between validations (0: none)")
    eval_iters: int = option(10, "global batches of the valid split per validation")
    torch_threads: Optional[int] = option(None, "CPU threads per process; None: cores / local processes")

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
        pp = parallel.pipeline_model_parallel_size
        micro = self.global_batch_size // (self.micro_batch_size * dp)
        if pp > 1 and parallel.virtual_stages == 1 and parallel.pipeline_schedule == "1f1b" and micro < pp:
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
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"training.max_nonfinite_skips={self.max_nonfinite_skips} must be >= 0")
        if self.spiky_loss_factor <= 1:
            raise ConfigError(f"training.spiky_loss_factor={self.spiky_loss_factor} must be > 1")
        if self.rerun_mode not in ("disabled", "validate_results"):
            raise ConfigError(f"--rerun-mode={self.rerun_mode!r}: use disabled or validate_results")
        if self.fp8 and self.transformer_engine == "off":
            raise ConfigError("training.fp8 needs Transformer Engine linears; set training.transformer_engine to "
                              "auto or on, or unset training.fp8")

"""The parallel layout config (`parallel:`): sizes, schedule, backend, and the checks that they divide the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megamoe.config.model import ModelConfig
from megamoe.config.options import option
from megamoe.config.pattern import check_stages
from megamoe.errors import ConfigError

PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble")


@dataclass
class ParallelConfig:
    """Layout; data parallel size is what is left: world / (TP x CP x PP)."""

    tensor_model_parallel_size: int = option(1, "TP: each layer's weights split over this many ranks")
    pipeline_model_parallel_size: int = option(1, "PP: the layer stack split into this many stages")
    context_parallel_size: int = option(1, "CP: every sequence split into this many contiguous slices, one per rank")
    virtual_pipeline_model_parallel_size: Optional[int] = option(None, "stages per pipeline rank (interleaved)")
    expert_model_parallel_size: int = option(1, "EP: the experts of each MoE layer split over this many ranks")
    expert_tensor_parallel_size: Optional[int] = option(None, "None: same as TP (megatron-core's default)")
    sequence_parallel: bool = option(False, "between the TP regions each TP rank holds 1/TP of the sequence")
    distributed_optimizer: bool = option(False, "ZeRO-1: optimizer state sharded over the data-parallel replicas")
    pipeline_schedule: str = option("1f1b", "1f1b | interleaved_1f1b | zero_bubble")
    backend: str = option("auto", "auto (nccl with CUDA, gloo without) | nccl | gloo")
    distributed_timeout_minutes: int = option(30, "timeout of a collective that does not complete")
    heartbeat_timeout_seconds: float = option(120.0, "a rank silent this long is gone: the others exit (status 1) "
                                                     "for the launcher to restart the job; 0: off")

    @property
    def resolved_etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline rank (1 without interleaving)."""
        return self.virtual_pipeline_model_parallel_size or 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.context_parallel_size
                              * self.pipeline_model_parallel_size)

    def validate(self, world_size: int, model: ModelConfig) -> None:
        tp, pp, ep, etp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                           self.expert_model_parallel_size, self.resolved_etp)
        cp = self.context_parallel_size
        for flag, v in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                        ("expert-model-parallel-size", ep), ("expert-tensor-parallel-size", etp),
                        ("context-parallel-size", cp)):
            if v < 1:
                raise ConfigError(f"--{flag}={v} must be >= 1")
        if world_size % (tp * cp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
                f"--context-parallel-size ({cp}) x --pipeline-model-parallel-size ({pp}) = {tp * cp * pp}; "
                f"launch a multiple of {tp * cp * pp} processes or change the sizes")
        if world_size % (etp * ep * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
                f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp}); "
                f"the expert grid needs a multiple of {etp * ep * pp} processes")
        self._validate_model_split(model, tp, ep, etp)
        if self.virtual_stages > 1 and pp == 1:
            raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
        if self.heartbeat_timeout_seconds < 0:
            raise ConfigError(f"parallel.heartbeat_timeout_seconds={self.heartbeat_timeout_seconds} must be >= 0 "
                              "(0 turns the heartbeat off)")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r}: use auto, nccl or gloo")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(f"parallel.pipeline_schedule={self.pipeline_schedule!r}: use 1f1b, "
                              "interleaved_1f1b or zero_bubble")
        if pp > 1:  # the stages themselves: enough blocks, '|' marks that match PP x virtual stages
            check_stages(model, pp, self.virtual_stages)

    @staticmethod
    def _validate_model_split(model: ModelConfig, tp: int, ep: int, etp: int) -> None:
        """Every size divides what it splits."""
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
        shared = model.shared_expert_intermediate_size
        if "E" in model.pattern and shared is not None and shared % tp:
            raise ConfigError(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                              f"--tensor-model-parallel-size {tp}; the shared expert splits over TP like an FFN")
        has_moe = model.has_moe
        if has_moe and model.num_experts % ep:
            divisors = [d for d in range(1, model.num_experts + 1) if model.num_experts % d == 0]
            raise ConfigError(
                f"model.num_experts={model.num_experts} is not divisible by --expert-model-parallel-size="
                f"{ep}; expert-parallel sizes that work: {divisors}")
        if has_moe and model.resolved_d_expert % etp:
            raise ConfigError(f"--expert-tensor-parallel-size={etp} does not divide model.d_expert="
                              f"{model.resolved_d_expert}")

"""The whole run's config (`Config`): the data, checkpoint and logging sections, and the checks across sections."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import yaml

from megamoe.config.model import ModelConfig
from megamoe.config.options import is_number, option
from megamoe.config.parallel import ParallelConfig
from megamoe.config.training import OptimizerConfig, TrainingConfig
from megamoe.errors import ConfigError


def parse_data_path(data_path: Sequence) -> tuple:
    """--data-path: prefixes alone, or weight prefix pairs -> (prefixes, weights or None). The one rule every
    reader of --data-path uses (config validation, the datasets, evaluation)."""
    items = [str(x) for x in data_path]
    if not items:
        raise ConfigError("no --data-path given; pass the prefix tools/preprocess_data.py printed")
    numbers = [is_number(x) for x in items]
    if not any(numbers):
        return items, None
    if len(items) % 2 or numbers[0::2] != [True] * (len(items) // 2) or any(numbers[1::2]):
        raise ConfigError(f"--data-path {' '.join(items)}: give prefixes alone or weight prefix pairs, "
                          "e.g. --data-path 0.7 data/a_text_document 0.3 data/b_text_document")
    weights = [float(w) for w in items[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--data-path weights {weights} must be >= 0 and not all 0")
    return items[1::2], weights


# --tokenizer-type: Megatron-LM's names (and short ones) -> the backend in megamoe.data.tokenizer.
TOKENIZER_TYPES = {"GPTSentencePieceTokenizer": "sentencepiece", "SentencePieceTokenizer": "sentencepiece",
                   "Llama2Tokenizer": "sentencepiece", "sentencepiece": "sentencepiece",
                   "HuggingFaceTokenizer": "huggingface", "huggingface": "huggingface"}


def tokenizer_backend(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> str:
    """'sentencepiece' or 'huggingface': by --tokenizer-type, else by --tokenizer-model (a folder or a .json file
    is a Hugging Face tokenizer, any other file a sentencepiece model)."""
    if tokenizer_type:
        if tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type {tokenizer_type}: use one of {', '.join(TOKENIZER_TYPES)}")
        return TOKENIZER_TYPES[tokenizer_type]
    model = str(tokenizer_model or "")
    return "huggingface" if os.path.isdir(model) or model.endswith(".json") else "sentencepiece"


def same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


@dataclass
class DataConfig:
    """Megatron indexed datasets. data_path: prefixes, optionally weighted: [0.7, a, 0.3, b]."""

    data_path: list = option(help="prefixes of .bin/.idx pairs, or weight prefix pairs (a blend)", factory=list)
    split: str = option("949,50,1", "train,valid,test weights (Megatron's --split)")
    tokenizer_model: Optional[str] = option(None, "sentencepiece .model, or a Hugging Face tokenizer folder "
                                                  "(with tokenizer.json) or its tokenizer.json")
    tokenizer_type: Optional[str] = option(None, "SentencePieceTokenizer (GPTSentencePieceTokenizer, Llama2Tokenizer) "
                                                 "or HuggingFaceTokenizer; None: told by tokenizer_model (a folder "
                                                 "or .json file is Hugging Face's)")
    seq_length: int = option(256, "tokens per training sequence")
    num_workers: int = option(0, "DataLoader worker processes")
    cache_path: Optional[str] = option(None, "dataset index cache; None: <data dir>/index_cache (or a temp dir)")
    mock: bool = option(False, "random tokens, no files (for benchmarks and tests)")
    reset_position_ids: bool = option(False, "RoPE positions restart in every packed document")
    reset_attention_mask: bool = option(False, "packed documents do not see each other: attention is block-diagonal "
                                               "causal and Mamba's conv and scan restart at every document")
    eod_mask_loss: bool = option(False, "no loss on the token after an EOD (the next document's first)")

    def prefixes(self) -> list:
        """The dataset prefixes in data_path, without the blend weights."""
        return parse_data_path(self.data_path)[0]

    def validate(self) -> None:
        if self.seq_length < 1:
            raise ConfigError(f"--seq-length={self.seq_length} must be >= 1")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(is_number(p) for p in parts) or sum(map(float, parts)) <= 0:
            raise ConfigError(f"--split={self.split!r}: give three weights for train,valid,test, e.g. 949,50,1")
        backend = tokenizer_backend(self.tokenizer_type, self.tokenizer_model)
        if self.mock:
            return
        if not self.data_path:
            raise ConfigError("no training data: set --data-path to the prefix of a preprocessed .bin/.idx "
                              "pair (tools/preprocess_data.py writes them), or data.mock: true")
        for prefix in self.prefixes():
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(f"--data-path: {prefix + ext} does not exist; give the prefix of the "
                                      "files tools/preprocess_data.py wrote (without .bin/.idx)")
        if not self.tokenizer_model:
            raise ConfigError("--tokenizer-model is not set; give the tokenizer the data was preprocessed with (a "
                              "sentencepiece .model or a Hugging Face tokenizer folder)")
        if not os.path.exists(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model: {self.tokenizer_model} does not exist")
        if backend == "sentencepiece" and os.path.isdir(self.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {self.tokenizer_model} is a folder, but --tokenizer-type "
                              f"{self.tokenizer_type} is sentencepiece; give the .model file, or --tokenizer-type "
                              "HuggingFaceTokenizer for a folder with tokenizer.json")


@dataclass
class CheckpointConfig:
    """Saving and resuming (Megatron's --save / --load)."""

    save: Optional[str] = option(None, "folder for checkpoints (iter_NNNNNNN/ and a `latest` marker)")
    load: Optional[str] = option(None, "a checkpoint folder, or a --save folder (its latest) to resume from")
    save_interval: Optional[int] = option(None, "None: only at the end of training")
    keep_last: Optional[int] = option(None, "None: keep all")
    async_save: bool = option(False, "write checkpoints in the background while training goes on (one at a time)")
    finetune: bool = option(False, "--load the weights only: step 0, a new optimizer and schedule, the data from "
                                   "the start")
    no_load_optim: bool = option(False, "resume (step, data, RNG) with a new optimizer: e.g. from a model-only "
                                        "checkpoint")
    no_load_rng: bool = option(False, "resume without the checkpoint's random generators")


@dataclass
class LoggingConfig:
    """Progress lines, metrics.jsonl, TensorBoard, Weights & Biases and the loss plot."""

    log_dir: Optional[str] = option(None, "metrics.jsonl, TensorBoard events, loss.png; None: checkpoint.save or "
                                          "./runs")
    log_interval: int = option(10, "steps between progress lines and metrics records")
    tensorboard: bool = option(True, "write TensorBoard events too")
    peak_tflops: Optional[float] = option(None, "per device, for model FLOPs utilisation")
    wandb_project: Optional[str] = option(None, "Weights & Biases project for TensorBoard's scalars and the config "
                                                "(rank 0; pip install megamoe[wandb]); None: no W&B")
    wandb_exp_name: Optional[str] = option(None, "the W&B run's name (None: W&B picks one)")
    wandb_save_dir: Optional[str] = option(None, "where W&B keeps its files; None: <log_dir>/wandb")
    moe_per_layer_logging: bool = option(False, "each MoE layer's tokens per expert, dropped fraction, max/mean "
                                                "load and router entropy (every stage and expert rank)")


@dataclass
class Config:
    """A whole run: one section per concern."""

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
        self.optimizer.validate()
        self.training.validate(world_size, self.parallel)
        if self.data.data_path:  # one rule for --data-path, before any file is looked at
            parse_data_path(self.data.data_path)
        tp, cp = self.parallel.tensor_model_parallel_size, self.parallel.context_parallel_size
        if self.parallel.sequence_parallel and self.data.seq_length % (tp * cp):
            raise ConfigError(f"--sequence-parallel splits the sequence over TP: --seq-length {self.data.seq_length} "
                              f"is not divisible by --tensor-model-parallel-size {tp}"
                              + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
        if cp > 1:
            self._validate_context_parallel(cp)
        if self.training.fp8:
            self._validate_fp8_shapes()
        if check_files:
            self.data.validate()
        self._validate_checkpoint_paths()
        if self.logging.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb-project logs to Weights & Biases, which is not installed: "
                              "pip install megamoe[wandb] (or drop --wandb-project)")
        if self.checkpoint.finetune and not self.checkpoint.load:
            raise ConfigError("--finetune starts from the weights of a checkpoint: give --load DIR")
        t = self.training
        if (t.exit_signal_handler or t.exit_duration_in_mins) and not self.checkpoint.save:
            flag = "--exit-signal-handler" if t.exit_signal_handler else "--exit-duration-in-mins"
            raise ConfigError(f"{flag} stops the run early to resume it later: give --save DIR for its checkpoint")

    def _validate_context_parallel(self, cp: int) -> None:
        """Each CP rank holds a contiguous slice of L / CP tokens; the conv's halo is d_conv - 1 of them."""
        length, m = self.data.seq_length, self.model
        if length % cp:
            raise ConfigError(f"--context-parallel-size {cp} splits every sequence: --seq-length {length} is not "
                              f"divisible by it; use a multiple of {cp}")
        if "M" in m.pattern and length // cp < m.d_conv - 1:
            raise ConfigError(f"--context-parallel-size {cp}: each rank's slice of {length // cp} tokens is shorter "
                              f"than the conv's halo of model.d_conv - 1 = {m.d_conv - 1}; use fewer CP ranks")
        if m.has_moe and m.router_type == "expert_choice":
            raise ConfigError(f"model.router_type=expert_choice lets each expert pick from the whole micro-batch, "
                              f"which --context-parallel-size {cp} splits; use token_choice (the default) or CP 1")
        limited = m.capacity_factor is not None and m.capacity_factor > 0
        if m.has_moe and m.token_drop_policy == "probs" and limited:
            raise ConfigError(f"--moe-token-drop-policy probs ranks an expert's assignments over the whole "
                              f"micro-batch, which --context-parallel-size {cp} splits; use position (the default), "
                              "dropless routing (--moe-expert-capacity-factor 0) or CP 1")

    def _validate_checkpoint_paths(self) -> None:
        """--save can be written; --load exists, unless it is also --save: the same command then starts the run
        (nothing saved yet) or resumes it, as Megatron's launch scripts expect."""
        c = self.checkpoint
        if c.save:
            probe = c.save
            while not os.path.exists(probe):  # the nearest folder that exists must let us create the rest
                parent = os.path.dirname(os.path.abspath(probe))
                if parent == os.path.abspath(probe):
                    break
                probe = parent
            if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
                raise ConfigError(f"--save {c.save}: {probe} is not a writable folder; give a --save folder this "
                                  "process can write (on a filesystem every rank shares)")
        if c.load and not os.path.exists(c.load) and not same_folder(c.load, c.save):
            raise ConfigError(f"--load: {c.load} does not exist (a typo?); give a checkpoint folder or a --save "
                              "folder, or the --save folder itself to start a run that resumes itself")

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

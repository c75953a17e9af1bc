"""Loading a checkpoint for use, in one process or as TP shards: the home that generation, evaluation and their
tools share.

    model, cfg = load_for_inference(checkpoint, device)   any saved TP/PP/EP/DP layout, into one CPU or GPU process
    model, cfg = load_for_inference(checkpoint, device, tensor_parallel=N)   this rank's TP shard (torchrun, N ranks)
    model, cfg = load_for_inference(checkpoint, device, bf16=True)           bfloat16 weights: half the bytes to read
    for_cpu_decoding(model)                               what load_for_inference does on CPU: the experts' layout
    tokenizer  = checkpoint_tokenizer(cfg)                the tokenizer the checkpoint's config names, or the one given
    cfg        = checkpoint.load_config(path)             the config alone (megamoe.checkpoint)
    add_loading_arguments(parser)                         the tools' --tokenizer-model/-type, --device, --threads,
                                                          --tensor-model-parallel-size (and --bf16, --compile)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megamoe import checkpoint
from megamoe.config import TOKENIZER_TYPES
from megamoe.data import load_tokenizer
from megamoe.errors import DataError, InferenceError
from megamoe.model import Experts, build_model, count_parameters
from megamoe.ops.linear import store_out_in
from megamoe.parallel import detect_launch_env, init_distributed
from megamoe.parallel.parallelize import build_parallel_model


def add_loading_arguments(parser, tensor_parallel: bool = True, decoding: bool = False) -> None:
    """The flags every tool that loads a checkpoint for use shares (generate, evaluate, serve), with
    --tensor-model-parallel-size unless `tensor_parallel` is False, and --bf16 and --compile for the `decoding`
    tools (a perplexity would move with bf16; compiling serves the decode steps alone)."""
    parser.add_argument("--tokenizer-model",
                        help="sentencepiece .model or Hugging Face tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES),
                        help="as in training (default: the checkpoint's, or told by --tokenizer-model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    if tensor_parallel:
        parser.add_argument("--tensor-model-parallel-size", type=int, default=1, dest="tensor_parallel",
                            help="split each layer over this many processes, for a model larger than one device "
                                 "(launch them with torchrun --nproc-per-node N; rank 0 prints)")
    if decoding:
        parser.add_argument("--bf16", action="store_true",
                            help="decode with bfloat16 weights (half the memory and the bytes each token reads; "
                                 "the Mamba state, A and D, the router and the norms compute in float32)")
        parser.add_argument("--compile", action="store_true",
                            help="decode steps through torch.compile (models without attention, one process): "
                                 "0.6-0.7x an eager step's time on CPU, after 10-20 s of compiling at the first "
                                 "step of each batch size")


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device` (GPU), or available RAM (CPU); None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def checkpoint_tokenizer(cfg, tokenizer_model: Optional[str] = None, required: bool = True,
                         tokenizer_type: Optional[str] = None):
    """The tokenizer `tokenizer_model` names (of `tokenizer_type`, else told by the path), else the one the
    checkpoint's config names (with its data.tokenizer_type). DataError when it is missing (None instead when not
    `required` and none was asked for) or larger than the model's vocabulary."""
    named = tokenizer_model or cfg.data.tokenizer_model
    kind = tokenizer_type if tokenizer_model else tokenizer_type or cfg.data.tokenizer_type
    if not tokenizer_model and not (named and os.path.exists(named)):
        if not required:
            return None
        if not named:
            raise DataError("the checkpoint's config names no tokenizer (trained on mock data?); pass "
                            "--tokenizer-model PATH")
        raise DataError(f"the checkpoint's tokenizer {named} does not exist here; pass --tokenizer-model PATH")
    tokenizer = load_tokenizer(named, kind)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer {named} has {tokenizer.vocab_size} pieces, more than the model's vocabulary "
                        f"of {cfg.model.vocab_size}: it is not the tokenizer the model was trained with")
    return tokenizer


def load_for_inference(path: str, device: Optional[str] = None, tensor_parallel: int = 1, bf16: bool = False):
    """(model in eval mode on `device`, its Config) from checkpoint `path` (a checkpoint folder, or a --save
    folder's latest), whatever TP/PP/EP/DP layout it was saved in. tensor_parallel N > 1: this rank's shard of a
    TP-N model (every rank of an N-process torchrun launch calls it; the first call starts torch.distributed).
    CheckpointError for a missing or damaged checkpoint; InferenceError when the model cannot run here (no such
    device, not enough memory, a launch of the wrong size); ConfigError when the model cannot split N ways.
    bf16: the weights in bfloat16 after loading, but for Mamba's A_log and D (see to_bf16)."""
    path = checkpoint.resolve(path)
    cfg = checkpoint.load_config(path)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {device} asked for, but this machine has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InferenceError(f"--device {device}: use cpu or cuda")
    if tensor_parallel < 1:
        raise InferenceError(f"--tensor-model-parallel-size {tensor_parallel} must be >= 1")
    # What one device holds: fp32 weights as the checkpoint is read (a TP shard each on GPUs; CPU ranks share one
    # machine's RAM); one process casts to bf16 on the CPU before moving the model to its GPU.
    params = count_parameters(cfg.model)["total"]
    need = params * 4 // (tensor_parallel if device.type == "cuda" else 1)
    need //= 2 if device.type == "cuda" and bf16 and tensor_parallel == 1 else 1
    have = available_bytes(device)
    if have is not None and need > have:
        raise InferenceError(f"{path}: the model's {params / 1e6:.0f}M parameters need {need / 2**30:.1f} GiB of "
                             f"{device.type} memory, more than the {have / 2**30:.1f} GiB available here; run it on a "
                             "machine with more memory" + (" or split it with --tensor-model-parallel-size"
                                                           if device.type == "cuda" else ""))
    if tensor_parallel != 1:
        model = _load_tensor_parallel(path, cfg, device, tensor_parallel)
    else:
        model = build_model(cfg.model, seed=cfg.training.seed)  # every weight is then read from the checkpoint
        checkpoint.load(path, model, None, cfg, None)  # model only: the training run's generators stay saved
    model = to_bf16(model) if bf16 else model
    if device.type == "cpu":
        for_cpu_decoding(model)
    return model.to(device).eval(), cfg  # (a TP shard is on its device already)


FP32_IN_BF16 = ("A_log", "D", "expert_bias")  # what to_bf16 leaves in float32


def to_bf16(model):
    """The model with bfloat16 weights, in place, but for each Mamba layer's A_log and D (A = -exp(A_log) sets the
    state's decay, which bfloat16's 8 bits of mantissa would move; both are small) and the routers' expert bias
    (it decides the top-k). The recurrent state stays float32 (MambaMixer.allocate_inference_cache), as do the
    router's and the norms' arithmetic."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    keep = {name: t.detach().float().clone() for name, t in tensors if name.rsplit(".", 1)[-1] in FP32_IN_BF16}
    model.to(torch.bfloat16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in keep:
            t.data = keep[name]
    return model


def for_cpu_decoding(model):
    """The model, in place, with every expert weight stored (out, in) (ops.linear.store_out_in), the layout in
    which a one-token CPU step reads it fastest (bench/bench_generate.py). Values and shapes are unchanged, and so
    is every other path: torch's products take either layout."""
    for module in model.modules():
        if isinstance(module, Experts):
            for weight in module.parameters():
                weight.data = store_out_in(weight.data)
    return model


def _load_tensor_parallel(path: str, cfg, device: torch.device, tp: int):
    """This rank's TP shard of the checkpoint's model, in a TP-only layout of every rank of the launch."""
    world = detect_launch_env().world_size  # torchrun's, mpirun's or srun's, as init_distributed reads it
    if world != tp:
        raise InferenceError(f"--tensor-model-parallel-size {tp} needs {tp} processes, one per shard (torchrun "
                             f"--nproc-per-node {tp}); this launch has {world}")
    parallel = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1, expert_tensor_parallel_size=None,
        sequence_parallel=False, backend="gloo" if device.type == "cpu" else "nccl")
    parallel.validate(world, cfg.model)
    # The layers of one process: megatron-core's TP linears, not Transformer Engine's (no FP8 in decoding).
    training = dataclasses.replace(cfg.training, transformer_engine="off", fp8=None)
    cfg = dataclasses.replace(cfg, parallel=parallel, training=training)
    topo = init_distributed(parallel)
    model = build_parallel_model(cfg, topo)  # every weight is then read from the checkpoint
    checkpoint.load(path, model, None, cfg, topo)
    return model.eval()

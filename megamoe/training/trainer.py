"""The training loop: one visible loop over optimizer steps, each over micro-batches.

`train(cfg)` validates the config, starts the process groups, builds tokenizer, model, optimizer and
data, optionally resumes, then runs: micro-batches with gradient accumulation -> gradient reduction
over data-parallel replicas -> global-norm clipping -> AdamW step, with periodic logging, validation
and checkpoints. Returns a summary dict (final losses, paths) for callers and tests.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megamoe import checkpoint
from megamoe.config import Config, ConfigError
from megamoe.config.run import same_folder
from megamoe.data import build_data_iterators, check_indexed_dataset, check_tokenizer_matches, load_tokenizer
from megamoe.errors import CheckpointError
from megamoe.logging import ONCE, Progress, get_logger
from megamoe.model import Block, count_parameters
from megamoe.parallel import detect_launch_env, init_distributed, set_seed
from megamoe.parallel.distributed_optimizer import ParamOwners
from megamoe.parallel.heartbeat import start_heartbeat
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.parallel.te import fast_paths
from megamoe.training.early_exit import EarlyExit
from megamoe.training.guard import StepGuard
from megamoe.training.loss_scale import LossScaler
from megamoe.training.metrics import IntervalMeans, RunLogger
from megamoe.training.optimizer import build_optimizer, optimizer_backend
from megamoe.training.schedule import lr_at
from megamoe.training.state import TrainState
from megamoe.training.step import evaluate, make_runner, train_step

log = get_logger()


def _set_threads(cfg: Config, local_world_size: int) -> None:
    if torch.cuda.is_available():
        return
    threads = cfg.training.torch_threads or max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(threads)


def _log_dir(cfg: Config) -> str:
    return cfg.logging.log_dir or cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _resume_from(cfg: Config) -> Optional[str]:
    """What --load resumes from: None for a fresh start. --load X --save X (Megatron's launch scripts) starts from
    scratch while X holds no checkpoint yet, with one warning; a --load of its own that holds none is an error (a
    typo, most likely). A damaged or half-written checkpoint fails later, in checkpoint.load, with the file."""
    load = cfg.checkpoint.load
    if not load or checkpoint.holds_checkpoint(load):
        return load
    if same_folder(load, cfg.checkpoint.save):
        log.warning(f"--load {load}: no checkpoint there yet; starting from scratch (it is also --save, so a restart "
                    "resumes from there)", extra=ONCE)
        return None
    raise CheckpointError(f"--load: {load} holds no checkpoint (no {checkpoint.LATEST} marker, no complete "
                          "iter_* folder); check the path, or drop --load to start from scratch")


def _check_same_run(cfg: Config, topo) -> None:
    """Every rank runs the same config on the same data: a rank launched with another --data-path (or a node with
    other files at the same path) would train another model. Every rank gets the same verdict."""
    files = {} if cfg.data.mock else {p + ext: os.path.getsize(p + ext) if os.path.exists(p + ext) else None
                                      for p in cfg.data.prefixes() for ext in (".bin", ".idx")}
    mine = (cfg.to_dict(), files)
    every = [mine]
    if topo.world_size > 1:
        every = [None] * topo.world_size
        dist.all_gather_object(every, mine)
    (config0, files0) = every[0]
    for rank, (config, files) in enumerate(every):
        diffs = [f"{section}.{key}: {value!r} (rank 0: {config0[section][key]!r})"
                 for section, values in config.items() for key, value in values.items()
                 if config0[section].get(key) != value]
        diffs += [f"{name}: {size} bytes (rank 0: {files0.get(name)})" for name, size in files.items()
                  if files0.get(name) != size]
        if diffs:
            raise ConfigError(f"rank {rank} does not run what rank 0 runs: " + "; ".join(diffs[:4])
                              + "; launch every rank with the same command and the same data files")


class _Saver:
    """--save: a checkpoint now, or in the background with --async-save (one at a time: the next save, an early
    exit and the end of training wait for it); `last` is the newest complete checkpoint."""

    def __init__(self, cfg: Config, topo):
        self.cfg, self.topo = cfg, topo
        self.pending: Optional[checkpoint.PendingSave] = None
        self.last: Optional[str] = None
        self.stager = checkpoint.BoxStager() if cfg.checkpoint.async_save else None

    def save(self, model, optimizer, state: TrainState, final: bool) -> None:
        self.wait()
        c = self.cfg.checkpoint
        if c.async_save:
            self.pending = checkpoint.save_async(c.save, model, optimizer, state, self.cfg, self.topo, self.stager)
            if final:
                self.wait()
        else:
            self.last = checkpoint.save(c.save, model, optimizer, state, self.cfg, self.topo)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.last = pending.wait()


def _samples(state: TrainState, tcfg, topo, num_micro: int) -> list:
    """The global sample indices of this rank's micro-batches of the next step (Megatron's order)."""
    mbs, first = tcfg.micro_batch_size, state.consumed_train_samples + topo.dp_rank * tcfg.micro_batch_size
    return [f"{first + j * mbs * topo.dp}-{first + j * mbs * topo.dp + mbs - 1}" for j in range(num_micro)]


def train(cfg: Config) -> dict:
    """Run a whole training job as configured; returns a summary dict."""
    started = time.monotonic()
    env = detect_launch_env()
    cfg.validate(env.world_size)
    _set_threads(cfg, env.local_world_size)
    topo = init_distributed(cfg.parallel)
    _check_same_run(cfg, topo)
    heartbeat = start_heartbeat(topo, cfg.parallel.heartbeat_timeout_seconds)
    try:
        summary = _train(cfg, topo, started)
    except BaseException:
        if heartbeat:  # not marked done: this rank's watcher tells the others, unless they stop with it
            heartbeat.stop(done=False)
        raise
    if heartbeat:
        heartbeat.stop(done=True)
        dist.barrier()  # no rank leaves (and takes a store it holds along) while another still beats
    return summary


def _train(cfg: Config, topo, started: float) -> dict:
    set_seed(cfg.training.seed)
    load = _resume_from(cfg)
    tokenizer = None
    if cfg.data.tokenizer_model or not cfg.data.mock:  # sentencepiece or Hugging Face, as data.tokenizer_type says
        tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    if not cfg.data.mock:  # damaged files or a mismatched tokenizer fail before the model is built
        for prefix in cfg.data.prefixes():
            check_indexed_dataset(prefix)
            check_tokenizer_matches(prefix, tokenizer)
    if load and cfg.model.vocab_size is None:
        # The padded vocabulary depends on TP: a run resumed in another layout keeps the checkpoint's.
        cfg.model.vocab_size = checkpoint.load_config(load).model.vocab_size
        if cfg.model.vocab_size % topo.tp:
            raise ConfigError(f"--load: the checkpoint's vocab_size {cfg.model.vocab_size} does not divide by "
                              f"--tensor-model-parallel-size {topo.tp}; pass --model.vocab_size N")
    cfg.model.vocab_size = cfg.model.padded_vocab_size(tokenizer.vocab_size if tokenizer else None, topo.tp,
                                                       cfg.data.tokenizer_model)
    paths = fast_paths(cfg, topo.device)
    model = build_parallel_model(cfg, topo, paths)
    runner = make_runner(model, cfg, topo)
    owners = ParamOwners(model.parameters(), topo) if cfg.parallel.distributed_optimizer else None
    optimizer = build_optimizer(model, cfg.optimizer, topo.device, keep=owners.owns if owners else None)
    state = TrainState()
    if load and cfg.checkpoint.finetune:  # the weights only: step, optimizer and data start anew
        checkpoint.load(load, model, None, cfg, topo)
        log.info(f"finetuning from the weights in {load}, from step 0 with a new optimizer")
    elif load:
        c = cfg.checkpoint
        checkpoint.load(load, model, None if c.no_load_optim else optimizer, cfg, topo, state,
                        rng=not c.no_load_rng)
        log.info(f"resumed from {checkpoint.resolve(load)} at step {state.step}")
    scaler = LossScaler.from_config(cfg.training)
    if scaler:
        scaler.load_state_dict(state.loss_scaler)

    log_dir = _log_dir(cfg)
    counts = count_parameters(cfg.model)
    _log_start(cfg, topo, model, paths, scaler, owners, optimizer, counts, log_dir)
    train_iter, valid_batches = build_data_iterators(
        cfg, topo.dp_rank, topo.dp, consumed_train_samples=state.consumed_train_samples,
        vocab_size=cfg.model.vocab_size, pin_memory=topo.device.type == "cuda")
    tcfg = cfg.training
    num_micro = tcfg.global_batch_size // (tcfg.micro_batch_size * topo.dp)
    tokens_per_step = tcfg.global_batch_size * cfg.data.seq_length
    run_log = RunLogger(log_dir, cfg, counts, topo)
    progress = Progress(tcfg.train_iters, state.step)
    interval = IntervalMeans(runner.moe_layer_names if cfg.logging.moe_per_layer_logging else None)
    guard, saver = StepGuard(tcfg), _Saver(cfg, topo)
    saver.last = checkpoint.resolve(load) if load and not cfg.checkpoint.finetune else None
    record = {}
    model.train()
    stop = None
    with EarlyExit(cfg, topo, started) as early_exit:
        while state.step < tcfg.train_iters and not stop:
            start = time.perf_counter()
            batches = [next(train_iter) for _ in range(num_micro)]
            # As Megatron's scheduler: the LR advances with successful updates only.
            lr = lr_at(state.step - state.skipped_steps, cfg.optimizer, tcfg.train_iters)
            record = train_step(runner, optimizer, batches, cfg, topo, lr, owners, scaler, guard,
                                _samples(state, tcfg, topo, num_micro))
            state.skipped_steps += record.get("skipped_step", 0)
            state.nonfinite_steps += record.get("nonfinite_step", 0)
            state.step += 1
            state.consumed_train_samples += tcfg.global_batch_size
            record.update(step=state.step, consumed_samples=state.consumed_train_samples,
                          step_time_s=time.perf_counter() - start)
            interval.add(record, tokens_per_step)
            guard.after(state.step, record, saver.last)  # stops the run after too many non-finite steps
            stop = early_exit.reason(state.step) if state.step < tcfg.train_iters else None
            last = state.step == tcfg.train_iters
            if tcfg.eval_interval and (state.step % tcfg.eval_interval == 0 or last) and valid_batches:
                record["valid_loss"] = evaluate(runner, valid_batches(), cfg, topo)
                record["valid_ppl"] = math.exp(min(record["valid_loss"], 50.0))
            if state.step % cfg.logging.log_interval == 0 or last or stop or "valid_loss" in record:
                record = interval.means(record)
                run_log.log(record, progress)
            if cfg.checkpoint.save and (last or stop or (cfg.checkpoint.save_interval
                                                         and state.step % cfg.checkpoint.save_interval == 0)):
                state.loss_scaler = scaler.state_dict() if scaler else {}
                saver.save(model, optimizer, state, final=bool(last or stop))
    saver.wait()
    if stop:
        saved = f"; checkpoint in {cfg.checkpoint.save}, resume with --load" if cfg.checkpoint.save else ""
        log.info(f"stopping early at step {state.step} of {tcfg.train_iters}: {stop}{saved}")
    plot = run_log.close()
    return dict(final=record, log_dir=log_dir, plot=plot, step=state.step, stopped=stop,
                checkpoint=cfg.checkpoint.save, metrics=run_log.metrics.path)


def _log_start(cfg: Config, topo, model, paths, scaler, owners, optimizer, counts: dict, log_dir: str) -> None:
    """The start-up lines: layout, model size, the paths in use; the resolved config in the log folder."""
    log.info(topo.describe())
    log.info(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token "
             f"(pattern {cfg.model.pattern})")
    precision = f"FP8 {cfg.training.fp8} ({cfg.training.fp8_recipe} scaling)" if cfg.training.fp8 else (
        "bf16 autocast" if cfg.training.bf16 else
        f"fp16 autocast, loss scale {scaler.scale:g}{'' if scaler.dynamic else ' (constant)'}" if scaler else "fp32")
    scan = "Triton kernels" if topo.device.type == "cuda" else "chunked PyTorch scan (CPU)"
    recomputed = sum(b.recompute for b in model.modules() if isinstance(b, Block))
    log.info(f"paths: precision {precision}; {paths.describe()}; scan: {scan}; "
             f"optimizer: {optimizer_backend(topo.device)}{' + ZeRO-1' if owners else ''}; "
             f"activation recompute: {recomputed} of this rank's blocks")
    if recomputed and topo.pp > 1 and cfg.parallel.pipeline_schedule == "zero_bubble":
        # Measured in a PP2 parity run (3 steps): 156-180 recomputed block forwards per rank, 36 with 1f1b.
        log.warning("zero_bubble with activation recompute: every weight-gradient pass recomputes the blocks' "
                    "forward again (about 5x the recompute work of 1f1b); prefer 1f1b or interleaved_1f1b with it",
                    extra=ONCE)
    log.info("resolved config:\n" + cfg.to_yaml())
    if topo.is_rank0:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())

"""The training loop: one visible loop over optimizer steps, each over micro-batches.

`train(cfg)` validates the config, starts the process groups, builds tokenizer, model, optimizer and
data, optionally resumes, then runs: micro-batches with gradient accumulation -> gradient reduction
over data-parallel replicas -> global-norm clipping -> AdamW step, with periodic logging, validation
and checkpoints. Returns a summary dict (final losses, paths) for callers and tests.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamoe.config import Config, ConfigError
from megamoe.logging import Progress, get_logger
from megamoe.model.lm import Block, MoETotals
from megamoe.model.moe import aux_loss_scale
from megamoe.parallel import Topology, detect_launch_env, init_distributed, set_seed
from megamoe.parallel.data_parallel import GradientReducer, clip_gradients
from megamoe.parallel.distributed_optimizer import ParamOwners
from megamoe.parallel.te import fast_paths, fp8_context
from megamoe.training.loss_scale import LossScaler
from megamoe.training.optimizer import build_optimizer, optimizer_backend
from megamoe.training.schedule import lr_at

log = get_logger()


@dataclass
class TrainState:
    """What a resumed run needs besides model and optimizer: saved in every checkpoint."""

    step: int = 0
    consumed_train_samples: int = 0
    loss_scaler: dict = field(default_factory=dict)  # --fp16's dynamic loss scale (LossScaler.state_dict)
    skipped_steps: int = 0  # --fp16 steps skipped on overflow; the LR schedule counts only the others


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int | None, tp: int) -> int:
    """The model's vocab: as configured, else the tokenizer's padded to a multiple of
    make_vocab_size_divisible_by x TP (Megatron's rule, so every TP shard is the same size)."""
    if cfg.model.vocab_size is not None:
        if tokenizer_vocab is not None and cfg.model.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer_vocab} pieces ({cfg.data.tokenizer_model}); leave it unset")
        return cfg.model.vocab_size
    if tokenizer_vocab is None:
        raise ConfigError("model.vocab_size is not set and there is no --tokenizer-model to take it from")
    multiple = cfg.model.make_vocab_size_divisible_by * tp
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def _autocast(cfg: Config, device: torch.device):
    dtype = cfg.training.autocast_dtype
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def _mean_over_dp(values: torch.Tensor, topo: Topology) -> torch.Tensor:
    if topo.dp > 1:
        values = values.to(topo.device)
        dist.all_reduce(values, group=topo.dp_group)
        values = values / topo.dp
    return values.cpu()


class MicroBatches:
    """Runs one step's micro-batches through the whole model, one after another (no pipeline)."""

    def __init__(self, model, cfg: Config, topo: Topology):
        self.model, self.cfg, self.topo = model, cfg, topo
        self.loss_scale = 1.0  # what the LM loss is multiplied by before backward (--fp16)

    def _forward(self, batch):
        batch = {k: v.to(self.topo.device, non_blocking=True) for k, v in batch.items()}  # from pinned memory
        return self.model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])

    def forward_backward(self, batches: list) -> tuple:
        """Sums over micro-batches of [lm loss, aux loss, z loss, dropped, assignments], tokens per expert."""
        lm_loss, moe = 0.0, MoETotals(self.cfg.model.num_experts)
        for batch in batches:
            out = self._forward(batch)
            (out.lm_loss * (self.loss_scale / len(batches))).backward()
            lm_loss += out.lm_loss.item()
            moe.add(out.aux_loss, out.z_loss, out.moe_stats)
        return torch.cat([torch.tensor([lm_loss], dtype=torch.float64), moe.sums]), moe.tokens_per_expert

    def sync_shared_grads(self) -> None:
        """Nothing is shared between stages without a pipeline."""

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        return sum(float(self._forward(b).lm_loss) for b in batches) / max(1, len(batches))


def make_runner(model, cfg: Config, topo: Topology):
    """What runs a step's micro-batches: the pipeline schedule under PP, else a plain loop."""
    if topo.pp > 1:
        from megamoe.parallel.pipeline import Pipeline
        tcfg = cfg.training
        runner = Pipeline(model, cfg, topo, tcfg.global_batch_size // (tcfg.micro_batch_size * topo.dp))
    else:
        runner = MicroBatches(model, cfg, topo)
    runner.reducer = GradientReducer(model.parameters(), topo)
    return runner


def train_step(runner, optimizer, batches, cfg: Config, topo: Topology, lr: float, owners=None,
               scaler=None) -> dict:
    """One optimizer step over `batches` (this rank's micro-batches); returns step metrics.
    `owners` (ZeRO-1): the optimizer steps only this rank's parameters, then they are broadcast.
    `scaler` (--fp16): the losses are multiplied by its scale, the gradients divided by it after reduction,
    and a step whose gradient norm is not finite is skipped (on every rank: the norm is global)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    runner.model.zero_grad(set_to_none=True)
    runner.reducer.start(len(batches))
    runner.loss_scale = scaler.scale if scaler else 1.0
    # The MoE losses are scaled as the LM loss is: 1 / micro-batches (x the loss scale).
    with _autocast(cfg, topo.device), fp8_context(cfg), aux_loss_scale(runner.loss_scale / len(batches)):
        sums, tokens_per_expert = runner.forward_backward(batches)
    runner.reducer.finish()
    runner.sync_shared_grads()
    params = [p for p in runner.model.parameters() if p.requires_grad]
    if scaler:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, runner.loss_scale)
    grad_norm = clip_gradients(params, cfg.optimizer.clip_grad, topo)
    skipped = scaler is not None and not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
        if owners is not None:
            owners.broadcast()
    if scaler:
        scaler.update(overflow=skipped)
    sums = _mean_over_dp(torch.cat([sums, tokens_per_expert]), topo)
    lm, aux, z = (sums[:3] / len(batches)).tolist()
    record = dict(loss=lm + aux + z, lm_loss=lm, aux_loss=aux, z_loss=z, lr=lr, grad_norm=grad_norm)
    if scaler:
        record.update(loss_scale=runner.loss_scale, skipped_step=int(skipped))
    if sums[4] > 0:
        load = sums[5:]
        record["fraction_dropped"] = float(sums[3] / sums[4])
        record["expert_load_max_over_mean"] = float(load.max() / load.mean().clamp(min=1e-9))
        record["tokens_per_expert"] = [round(float(n), 2) for n in load]  # summed over MoE layers, mean over DP
    return record


def evaluate(runner, batches, cfg: Config, topo: Topology) -> float:
    """Mean LM loss over the given validation micro-batches, averaged over data-parallel ranks."""
    runner.model.eval()
    try:
        with _autocast(cfg, topo.device), fp8_context(cfg):
            loss = runner.evaluate(batches)
    finally:
        runner.model.train()
    return float(_mean_over_dp(torch.tensor([loss], dtype=torch.float64), topo))


class EarlyExit:
    """Megatron's clean early exits: at a SIGTERM (--exit-signal-handler; Slurm's `--signal=TERM@120` to srun
    tasks; a torchrun agent forwards it but kills its workers 30 s later), after --exit-duration-in-mins, or
    every --exit-interval steps. The run saves a checkpoint (with --save) and returns; every rank stops at the same
    step, since a signal or a clock reaches the ranks at different steps."""

    def __init__(self, cfg: Config, topo: Topology, start: float):
        self.cfg, self.topo = cfg.training, topo
        self.signalled = False
        self.start = start  # time.monotonic() when the run started, set-up included (as Megatron counts)
        self._installed = self.cfg.exit_signal_handler
        if self._installed:
            if threading.current_thread() is not threading.main_thread():
                raise ConfigError("--exit-signal-handler installs a SIGTERM handler, which Python allows only on "
                                  "the main thread; call train() there or drop the flag")
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def reason(self, step: int) -> str | None:
        """Why the run stops after `step`, the same on every rank; None to go on."""
        t = self.cfg
        if t.exit_signal_handler or t.exit_duration_in_mins:
            late = t.exit_duration_in_mins and time.monotonic() - self.start > 60 * t.exit_duration_in_mins
            flag = torch.tensor([2 if self.signalled else 1 if late else 0], device=self.topo.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag = int(flag.item())
            if flag == 2:
                return "SIGTERM received (--exit-signal-handler)"
            if flag == 1:
                return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
        if t.exit_interval and step % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        return None

    def __enter__(self) -> EarlyExit:
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: the previous handler was not set from Python; the default then
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def _set_threads(cfg: Config, local_world_size: int) -> None:
    if torch.cuda.is_available():
        return
    threads = cfg.training.torch_threads or max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(threads)


def _log_dir(cfg: Config) -> str:
    return cfg.logging.log_dir or cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def train(cfg: Config) -> dict:
    """Run a whole training job as configured; returns a summary dict."""
    from megamoe.data import build_data_iterators, check_indexed_dataset, check_tokenizer_matches, load_tokenizer
    from megamoe.model import count_parameters
    from megamoe.parallel.parallelize import build_parallel_model
    from megamoe import checkpoint
    from megamoe.training.metrics import IntervalMeans, RunLogger

    started = time.monotonic()
    env = detect_launch_env()
    cfg.validate(env.world_size)
    _set_threads(cfg, env.local_world_size)
    topo = init_distributed(cfg.parallel)
    set_seed(cfg.training.seed)

    tokenizer = None if cfg.data.mock and not cfg.data.tokenizer_model else load_tokenizer(cfg.data.tokenizer_model)
    if not cfg.data.mock:  # damaged files or a mismatched tokenizer fail before the model is built
        for prefix in cfg.data.prefixes():
            check_indexed_dataset(prefix)
            check_tokenizer_matches(prefix, tokenizer)
    if cfg.checkpoint.load and cfg.model.vocab_size is None:
        # The padded vocabulary depends on TP: a run resumed in another layout keeps the checkpoint's.
        cfg.model.vocab_size = checkpoint.load_config(cfg.checkpoint.load).model.vocab_size
        if cfg.model.vocab_size % topo.tp:
            raise ConfigError(f"--load: the checkpoint's vocab_size {cfg.model.vocab_size} does not divide by "
                              f"--tensor-model-parallel-size {topo.tp}; pass --model.vocab_size N")
    cfg.model.vocab_size = resolve_vocab_size(cfg, tokenizer.vocab_size if tokenizer else None, topo.tp)
    paths = fast_paths(cfg, topo.device)
    model = build_parallel_model(cfg, topo, paths)
    runner = make_runner(model, cfg, topo)
    owners = ParamOwners(model.parameters(), topo) if cfg.parallel.distributed_optimizer else None
    optimizer = build_optimizer(model, cfg.optimizer, topo.device, keep=owners.owns if owners else None)
    state = TrainState()
    if cfg.checkpoint.load and cfg.checkpoint.finetune:  # the weights only: step, optimizer and data start anew
        checkpoint.load(cfg.checkpoint.load, model, None, cfg, topo)
        log.info(f"finetuning from the weights in {cfg.checkpoint.load}, from step 0 with a new optimizer")
    elif cfg.checkpoint.load:
        c = cfg.checkpoint
        state = checkpoint.load(c.load, model, None if c.no_load_optim else optimizer, cfg, topo,
                                rng=not c.no_load_rng)
    scaler = LossScaler.from_config(cfg.training)
    if scaler:
        scaler.load_state_dict(state.loss_scaler)

    log_dir = _log_dir(cfg)
    counts = count_parameters(cfg.model)
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
                    "forward again (about 5x the recompute work of 1f1b); prefer 1f1b or interleaved_1f1b with it")
    log.info("resolved config:\n" + cfg.to_yaml())
    if topo.is_rank0:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())

    train_iter, valid_batches = build_data_iterators(
        cfg, topo.dp_rank, topo.dp, consumed_train_samples=state.consumed_train_samples,
        vocab_size=cfg.model.vocab_size, pin_memory=topo.device.type == "cuda")
    tcfg = cfg.training
    num_micro = tcfg.global_batch_size // (tcfg.micro_batch_size * topo.dp)
    tokens_per_step = tcfg.global_batch_size * cfg.data.seq_length
    run_log = RunLogger(log_dir, cfg, counts, topo)
    progress = Progress(tcfg.train_iters, state.step)
    interval = IntervalMeans()
    record = {}
    model.train()
    stop = None
    with EarlyExit(cfg, topo, started) as early_exit:
        while state.step < tcfg.train_iters and not stop:
            start = time.perf_counter()
            batches = [next(train_iter) for _ in range(num_micro)]
            # As Megatron's scheduler: the LR advances with successful updates only.
            lr = lr_at(state.step - state.skipped_steps, cfg.optimizer, tcfg.train_iters)
            record = train_step(runner, optimizer, batches, cfg, topo, lr, owners, scaler)
            state.skipped_steps += record.get("skipped_step", 0)
            state.step += 1
            state.consumed_train_samples += tcfg.global_batch_size
            elapsed = time.perf_counter() - start
            record.update(step=state.step, consumed_samples=state.consumed_train_samples, step_time_s=elapsed)
            interval.add(record, tokens_per_step)
            if not math.isfinite(record["loss"]) or not (math.isfinite(record["grad_norm"])
                                                         or record.get("skipped_step")):
                raise FloatingPointError(f"step {state.step}: loss {record['loss']} / grad norm "
                                         f"{record['grad_norm']} is not finite; lower --lr or check the data")
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
                checkpoint.save(cfg.checkpoint.save, model, optimizer, state, cfg, topo)
    if stop:
        saved = f"; checkpoint in {cfg.checkpoint.save}, resume with --load" if cfg.checkpoint.save else ""
        log.info(f"stopping early at step {state.step} of {tcfg.train_iters}: {stop}{saved}")
    plot = run_log.close()
    return dict(final=record, log_dir=log_dir, plot=plot, step=state.step, stopped=stop,
                checkpoint=cfg.checkpoint.save, metrics=run_log.metrics.path)

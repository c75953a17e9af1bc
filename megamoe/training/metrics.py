"""Where a run's metrics go: progress line, metrics.jsonl, TensorBoard, Weights & Biases, and loss.png at the end."""
from __future__ import annotations

import os
import resource
from typing import Optional

import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from megamoe.config import Config
from megamoe.errors import ConfigError
from megamoe.logging import MetricsWriter, Progress, get_logger, run_records, smooth
from megamoe.training.moe_routing import layer_metrics

log = get_logger()


def flops_per_token(counts: dict, cfg: Config) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (forward 2, backward 4; the non-embedding
    parameters plus the LM head, whose matmul runs even when tied to the embedding), plus attention's
    6 x 2 x L x d_model per attention layer (scores and weighted sum) and the scan's ~ 9 x d_inner x d_state
    per Mamba layer (forward and backward of the elementwise recurrence)."""
    m = cfg.model
    attention = m.pattern.count("A") * 12 * cfg.data.seq_length * m.d_model
    scan = m.pattern.count("M") * 9 * m.d_inner * m.d_state * 3
    matmul = counts["active_non_embedding"] + m.vocab_size * m.d_model
    return 6.0 * matmul + attention + scan


def peak_memory_gb(device) -> float:
    """This process's peak memory so far: allocated on the GPU, or resident (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class IntervalMeans:
    """Losses averaged over the steps since the last logged one, and tokens/s over them (as Megatron logs).
    `moe_layers` (the MoE layer names, --moe-per-layer-logging): each layer's routing over the interval."""

    KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "fraction_dropped")
    TIMES = ("step_time_s", "fwd_bwd_s")  # means over every step of the interval

    def __init__(self, moe_layers: Optional[list] = None):
        self.sums, self.times, self.steps, self.counted, self.tokens, self.seconds = {}, {}, 0, 0, 0, 0.0
        self.skipped = None  # steps without an update in the interval (Megatron's "number of skipped iterations")
        self.nonfinite = 0  # of them, steps with a non-finite loss or gradient (their losses are not averaged)
        self.moe_layers, self.moe_table = moe_layers, None  # the MoE totals tables of the interval, summed

    def add(self, record: dict, tokens: int) -> None:
        if record.get("nonfinite_step"):
            self.nonfinite += 1
        else:
            self.counted += 1
            for key in self.KEYS:
                if key in record:
                    self.sums[key] = self.sums.get(key, 0.0) + record[key]
        if "skipped_step" in record:
            self.skipped = (self.skipped or 0) + record["skipped_step"]
        table = record.pop("moe_layer_table", None)
        if table is not None and self.moe_layers is not None:
            self.moe_table = table if self.moe_table is None else self.moe_table + table
        for key in self.TIMES:
            self.times[key] = self.times.get(key, 0.0) + record.get(key, 0.0)
        self.steps += 1
        self.tokens += tokens
        self.seconds += record["step_time_s"]

    def means(self, record: dict) -> dict:
        """`record` (the last step's) with the interval's means, then start a new interval."""
        out = dict(record, **{k: v / self.counted for k, v in self.sums.items()},
                   **{k: v / self.steps for k, v in self.times.items()},
                   tokens_per_s=self.tokens / max(self.seconds, 1e-9))
        if self.skipped is not None:
            out["skipped_steps"] = self.skipped
        if self.nonfinite:
            out["nonfinite_steps"] = self.nonfinite
        if self.moe_table is not None:
            out.update(layer_metrics(self.moe_layers, self.moe_table))
        self.__init__(self.moe_layers)
        return out


def start_wandb(cfg: Config, log_dir: str):
    """Rank 0's Weights & Biases run (Megatron's --wandb-project, --wandb-exp-name, --wandb-save-dir), holding the
    resolved config; None, with a warning, when W&B cannot start (training goes on without it)."""
    try:
        import wandb
    except ImportError:  # Config.validate checked it is installed
        raise ConfigError("--wandb-project needs Weights & Biases: pip install megamoe[wandb]") from None
    save_dir = cfg.logging.wandb_save_dir or os.path.join(log_dir, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    try:
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_exp_name, dir=save_dir,
                          config=cfg.to_dict())
    except Exception as e:  # noqa: BLE001 - a W&B outage must not stop a training run
        log.warning(f"Weights & Biases did not start ({e}); metrics go to metrics.jsonl and TensorBoard only")
        return None


class RunLogger:
    """Rank 0 writes; other ranks hold an inert logger."""

    def __init__(self, log_dir: str, cfg: Config, counts: dict, topo):
        self.log_dir = log_dir
        self.cfg = cfg
        self.topo = topo
        self.metrics = MetricsWriter(log_dir if topo.is_rank0 else None)
        self.flops_per_token = flops_per_token(counts, cfg)
        self.tb = None
        if topo.is_rank0 and cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        self.wandb = start_wandb(cfg, log_dir) if topo.is_rank0 and cfg.logging.wandb_project else None

    def log(self, record: dict, progress: Progress) -> None:
        peak = self.cfg.logging.peak_tflops
        if peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (peak * 1e12 * self.topo.world_size)
        # The fullest rank's peak (pipeline stages and expert ranks differ), and every rank's mean forward-backward
        # time over the interval (the stragglers, as Megatron's straggler detector); every rank logs at the same
        # steps. The step's wall time is the same everywhere: each rank then waits for the slowest.
        mine = torch.tensor([peak_memory_gb(self.topo.device), record.get("fwd_bwd_s", 0.0)],
                            dtype=torch.float64, device=self.topo.device)
        every = [torch.empty_like(mine) for _ in range(self.topo.world_size)]
        dist.all_gather(every, mine)
        if not self.topo.is_rank0:
            return
        every = torch.stack(every).cpu()
        record["peak_mem_gb"] = float(every[:, 0].max())
        if self.topo.world_size > 1:
            times = every[:, 1]
            record.update(fwd_bwd_min_s=float(times.min()), fastest_rank=int(times.argmin()),
                          fwd_bwd_max_s=float(times.max()), slowest_rank=int(times.argmax()))
        log.info(progress.line(record["step"], record)
                 + (f" | valid {record['valid_loss']:.4f}" if "valid_loss" in record else ""))
        self.metrics.write(record)
        if self.tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):  # tokens per expert: one scalar per expert
                        self.tb.add_scalar(f"{key}/{i}", v, record["step"])
            self.tb.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])

    def close(self) -> Optional[str]:
        """Close writers and plot the loss curves; returns the plot's path (rank 0)."""
        self.metrics.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if not (self.topo.is_rank0 and self.metrics.path and os.path.exists(self.metrics.path)):
            return None
        return plot_losses(run_records(self.metrics.path), os.path.join(self.log_dir, "loss.png"))


def plot_losses(records: list, path: str) -> str:
    """Train loss (means over each log interval, and EMA-smoothed as the paper reports) and validation loss.
    matplotlib's Figure without pyplot: no backend is chosen for the process, nothing global is left open."""
    steps = [r["step"] for r in records if "lm_loss" in r]
    train = [r["lm_loss"] for r in records if "lm_loss" in r]
    smoothed = smooth(train)
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, train, alpha=0.3, color="C0", label="train LM loss (mean over log interval)")
    ax.plot(steps, smoothed, color="C0", label="train LM loss (EMA 0.7)")
    if valid:
        ax.plot(*zip(*valid), "o-", color="C1", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

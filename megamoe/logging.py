"""Rank-0 progress lines and the per-run metrics file (JSON lines, one object per logged step)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Optional

METRICS_FILE = "metrics.jsonl"


def _rank() -> int:
    """This process's rank: the process group's once it exists, else the launcher's RANK (0 alone)."""
    dist = sys.modules.get("torch.distributed")  # tools that never touch torch start faster without it
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


ONCE = {"once": True}  # log.warning(msg, extra=ONCE): a warning every rank raises alike, printed by rank 0 alone


def _rank0_or_warning(record: logging.LogRecord) -> bool:
    # Decided when a line is logged, not when the logger is made: loggers are made at import, before the
    # process group (and so the rank) exists.
    return (record.levelno >= logging.WARNING and not getattr(record, "once", False)) or _rank() == 0


def get_logger(name: str = "megamoe") -> logging.Logger:
    """A logger that prints on rank 0 only ('[megamoe] message'); other ranks log warnings and above."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler.addFilter(_rank0_or_warning)
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Appends one JSON object per call to <log_dir>/metrics.jsonl (rank 0 only) and flushes it,
    so a crashed run keeps every step it logged. Other tools read the file with `read_metrics`."""

    def __init__(self, log_dir: Optional[str]):
        self.path = os.path.join(log_dir, METRICS_FILE) if log_dir else None
        self._file = None
        if self.path and _rank() == 0:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._file:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_metrics(path: str) -> list:
    """Records of a metrics.jsonl file (or of the file in a run folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_records(path: str) -> list:
    """read_metrics, keeping what one uninterrupted run would have logged: a run resumed from a checkpoint
    appends again the steps after that checkpoint, and those later records replace the earlier ones."""
    records = []
    for record in read_metrics(path):
        step = record.get("step")
        if step is not None:
            while records and records[-1].get("step", -1) >= step:
                records.pop()
        records.append(record)
    return records


def smooth(values: list, keep: float = 0.7) -> list:
    """The exponential moving average the loss plots and the model comparison report (the paper smooths)."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else keep * ema + (1 - keep) * v
        out.append(ema)
    return out


class Progress:
    """The rank-0 progress line: step, losses, lr, tokens/s, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.start_time) / done * (self.total_steps - step)

    def line(self, step: int, record: dict) -> str:
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key, label, fmt in (("loss", "loss", ".4f"), ("lm_loss", "lm", ".4f"), ("aux_loss", "aux", ".4f"),
                                ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3f"),
                                ("tokens_per_s", "tok/s", ",.0f"), ("mfu", "mfu", ".1%"),
                                ("loss_scale", "loss scale", "g"), ("peak_mem_gb", "mem GB", ".2f")):
            if record.get(key) is not None:
                parts.append(f"{label} {format(record[key], fmt)}")
        if record.get("skipped_steps"):
            why = f"{record['nonfinite_steps']} non-finite" if record.get("nonfinite_steps") else "fp16 overflow"
            parts.append(f"skipped {record['skipped_steps']} ({why})")
        if "slowest_rank" in record:
            parts.append(f"fwd-bwd per rank {record['fwd_bwd_min_s']:.2f}-{record['fwd_bwd_max_s']:.2f} s "
                         f"(slowest rank {record['slowest_rank']})")
        parts.append(f"ETA {format_duration(self.eta(step))}")
        return " | ".join(parts)

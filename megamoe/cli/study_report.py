"""What a model comparison shows: every model's losses read back from its metrics.jsonl, one plot, one table.

    report({name: (run_dir, cfg, parameter counts)}, reference, out_dir) -> {"plot", "markdown", "json"} paths

The paper's measure (Pióro et al., 2024, Figure 1): the first step at which a model's smoothed training loss
reaches the reference's (Mamba's) final smoothed loss, and the speedup reference steps / that step. Losses are
smoothed by megamoe.logging.smooth, as the runs' own loss.png; wall-clock is the runs' training time (the sum of
their step times, evaluation excluded); tokens/s is that of the median logged step, so that a pause of a shared
machine does not count against one model.
"""
from __future__ import annotations

import json
import math
import os
import statistics

from matplotlib.figure import Figure

from megamoe.logging import run_records, smooth


def curves(run_dir: str, tokens_per_step: int) -> dict:
    """Steps, LM loss (raw and smoothed) and training seconds at each logged step; validation losses."""
    records = run_records(run_dir)
    train = [r for r in records if "lm_loss" in r]
    seconds, previous, elapsed = [], 0, 0.0
    for r in train:  # step_time_s is the mean over the log interval that ends at r["step"]
        elapsed += r["step_time_s"] * (r["step"] - previous)
        previous = r["step"]
        seconds.append(elapsed)
    valid = [r for r in records if "valid_loss" in r]
    at = dict(zip([r["step"] for r in train], seconds))
    return dict(steps=[r["step"] for r in train], loss=[r["lm_loss"] for r in train],
                smoothed=smooth([r["lm_loss"] for r in train]), seconds=seconds,
                valid_steps=[r["step"] for r in valid], valid_loss=[r["valid_loss"] for r in valid],
                valid_seconds=[at.get(r["step"], math.nan) for r in valid],
                tokens_per_s=tokens_per_step / statistics.median(r["step_time_s"] for r in train))


def first_step_at(curve: dict, target: float):
    """The first logged step whose smoothed loss is at or below `target` (None: never)."""
    return next((s for s, v in zip(curve["steps"], curve["smoothed"]) if v <= target), None)


def summarise(runs: dict, reference: str) -> tuple:
    """(rows, curves, target): one row per model (sizes, final losses, tokens/s, the paper's speedup over
    `reference`), every model's curves, and the reference's final smoothed loss."""
    data = {name: curves(run_dir, cfg.training.global_batch_size * cfg.data.seq_length)
            for name, (run_dir, cfg, _) in runs.items()}
    ref = data[reference]
    target = ref["smoothed"][-1]
    rows = []
    for name, (run_dir, cfg, counts) in runs.items():
        c = data[name]
        # the reference reaches its own final loss at its last step (its smoothed curve may dip below it earlier)
        step = c["steps"][-1] if name == reference else first_step_at(c, target)
        final_valid = c["valid_loss"][-1] if c["valid_loss"] else None
        rows.append(dict(
            model=name, pattern=cfg.model.pattern, total_params=counts["total_non_embedding"],
            active_params=counts["active_non_embedding"], total_params_with_embeddings=counts["total"],
            active_params_with_embeddings=counts["active"], steps=c["steps"][-1],
            final_train_loss_smoothed=c["smoothed"][-1], final_valid_loss=final_valid,
            final_valid_ppl=math.exp(final_valid) if final_valid is not None else None,
            tokens_per_s=c["tokens_per_s"], train_seconds=c["seconds"][-1],
            step_reaching_reference=step, speedup=ref["steps"][-1] / step if step else None,
            run_dir=run_dir))
    return rows, data, target


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown_table(rows: list, reference: str, target: float) -> str:
    lines = ["| model | pattern | total params | active params | valid loss | valid ppl | train loss (smoothed) "
             f"| tokens/s (median step) | train time | step at {reference}'s final loss | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['pattern']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M "
            f"| {_fmt(r['final_valid_loss'], '.3f')} | {_fmt(r['final_valid_ppl'], '.1f')} "
            f"| {r['final_train_loss_smoothed']:.3f} | {r['tokens_per_s']:,.0f} | {r['train_seconds']:.0f} s "
            f"| {_fmt(r['step_reaching_reference'], 'd', 'not reached')} | {_fmt(r['speedup'], '.2f')}"
            f"{'x' if r['speedup'] else ''} |")
    lines.append("")
    lines.append(f"Parameters without embeddings (the paper's count). Speedup: {reference}'s steps / the first step "
                 f"at which a model's smoothed training loss reaches {reference}'s final {target:.3f}.")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> str:
    """Smoothed training loss (lines) and validation loss (points) by step and by training time."""
    fig = Figure(figsize=(12, 4.5))
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    everything = []
    for i, (name, c) in enumerate(data.items()):
        color = f"C{i % 10}"
        for ax, x, vx in ((by_step, c["steps"], c["valid_steps"]), (by_time, c["seconds"], c["valid_seconds"])):
            ax.plot(x, c["smoothed"], color=color, label=f"{name} train (smoothed)")
            if c["valid_loss"]:
                ax.plot(vx, c["valid_loss"], "o--", color=color, alpha=0.6, markersize=4, label=f"{name} valid")
        everything += c["smoothed"][len(c["smoothed"]) // 10:] + c["valid_loss"]
    if everything:  # the part where the models differ, not the first steps' high loss
        low, high = min(everything), max(everything)
        by_step.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("loss (nats / token)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def report(runs: dict, reference: str, out_dir: str) -> dict:
    """Write study.png, study.md and study.json to `out_dir`; returns their paths."""
    rows, data, target = summarise(runs, reference)
    paths = dict(plot=os.path.join(out_dir, "study.png"), markdown=os.path.join(out_dir, "study.md"),
                 json=os.path.join(out_dir, "study.json"))
    plot(data, paths["plot"])
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(rows, reference, target))
    with open(paths["json"], "w") as f:
        json.dump(dict(reference=reference, reference_final_loss_smoothed=target, models=rows), f, indent=1)
    return paths

"""Three ways to route the quickstart's MoE-Mamba, trained on CPU side by side, with one plot of their LM loss and
max/mean expert load (docs/moe_routing.png):

    python examples/moe_routing/compare.py [--workdir quickstart] [--train-iters 300] [--nproc 2]

- switch:        the paper's Switch: top-1 of 8 experts (width 384), capacity 1.0, load-balancing loss 0.01
- bias:          the same experts, no balancing loss: aux-loss-free balancing by the expert bias (DeepSeek-V3)
- top2+shared:   fine-grained top-2 of 24 experts of width 128 plus a shared expert of width 128: the same
                 active expert width (2 x 128 + 128 = 384) and nearly the same total (24 x 128 = 8 x 384)

The data are the quickstart's (megamoe-quickstart's steps 1-3, reused when present under --workdir); each run is
megamoe-train on --nproc gloo processes with expert parallelism, with --moe-per-layer-logging, under
<workdir>/routing/<name>/. --mock trains on random tokens instead (a smoke test of the script).
"""
import argparse
import os
import subprocess
import sys
import time

import yaml
from matplotlib.figure import Figure

from megamoe.cli.quickstart import QUICKSTART_CONFIG, VOCAB_SIZE, prepare_data
from megamoe.config import build_config, config_from_dict
from megamoe.logging import read_metrics
from megamoe.model import count_parameters

VARIANTS = {
    "switch": ["--moe-router-topk", "1", "--moe-aux-loss-coeff", "0.01"],
    "bias": ["--moe-router-topk", "1", "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0",
             "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.001"],
    "top2+shared": ["--num-experts", "24", "--moe-ffn-hidden-size", "128", "--moe-router-topk", "2",
                    "--moe-shared-expert-intermediate-size", "128", "--moe-aux-loss-coeff", "0.01"],
}


def _run(name: str, config_path: str, flags: list, run_dir: str, nproc: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "megamoe.cli.train", "--config", config_path, *flags, "--moe-per-layer-logging",
           "--expert-model-parallel-size", str(nproc), "--logging.log_dir", run_dir]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _mean_layer_load(record: dict) -> float:
    """max/mean expert load of each MoE layer over the log interval, averaged over the layers."""
    loads = [v for k, v in record.items() if k.startswith("moe/") and k.endswith("/load_max_over_mean")]
    return sum(loads) / len(loads)


def _active(config_path: str, flags: list) -> int:
    cfg = build_config(config_path, flags)
    cfg.model.vocab_size = cfg.model.vocab_size or VOCAB_SIZE
    return count_parameters(cfg.model)["active_non_embedding"]


def plot(runs: dict, path: str) -> str:
    fig = Figure(figsize=(11, 4))
    loss_ax, load_ax = fig.subplots(1, 2)
    for i, (name, records) in enumerate(runs.items()):
        train = [r for r in records if "lm_loss" in r]
        ema, smoothed = None, []
        for r in train:
            ema = r["lm_loss"] if ema is None else 0.7 * ema + 0.3 * r["lm_loss"]
            smoothed.append(ema)
        loss_ax.plot([r["step"] for r in train], smoothed, color=f"C{i}", label=f"{name} (train, EMA 0.7)")
        valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
        if valid:
            loss_ax.plot(*zip(*valid), "o--", color=f"C{i}", alpha=0.6, label=f"{name} (valid)")
        load_ax.plot([r["step"] for r in train], [_mean_layer_load(r) for r in train], color=f"C{i}", label=name)
    loss_ax.set(xlabel="step", ylabel="LM loss (nats / token)", title="loss")
    load_ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert load (mean over MoE layers)")
    load_ax.axhline(1.0, color="gray", lw=0.8)
    for ax in (loss_ax, load_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--output", default=os.path.join("docs", "moe_routing.png"))
    parser.add_argument("--mock", action="store_true", help="random tokens, no corpus (a smoke test)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "routing"), exist_ok=True)
    with open(QUICKSTART_CONFIG) as f:
        config = yaml.safe_load(f)
    config["training"]["train_iters"] = args.train_iters
    if args.mock:
        config["data"].update(mock=True)
        config["model"]["vocab_size"] = VOCAB_SIZE
    else:
        data, tokenizer = prepare_data(workdir, workers=2)
        config["data"].update(data_path=[data], tokenizer_model=tokenizer)
    config_from_dict(config)  # fails here, with the key, before anything runs
    config_path = os.path.join(workdir, "routing", "base.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)

    runs, rows = {}, []
    for name, flags in VARIANTS.items():
        run_dir = os.path.join(workdir, "routing", name)
        seconds = _run(name, config_path, flags, run_dir, args.nproc)
        records = read_metrics(run_dir)
        runs[name] = records
        train = [r for r in records if "lm_loss" in r]
        valid = [r["valid_loss"] for r in records if "valid_loss" in r]
        rows.append((name, _active(config_path, flags), train[-1]["lm_loss"], valid[-1] if valid else float("nan"),
                     _mean_layer_load(train[-1]), train[-1].get("fraction_dropped", 0.0), seconds))
    print(f"\n{'routing':<12} {'active non-emb':>14} {'final LM loss':>13} {'valid loss':>10} "
          f"{'max/mean load':>13} {'dropped':>8} {'time':>7}")
    for name, active, loss, valid, load, dropped, seconds in rows:
        print(f"{name:<12} {active:>14,} {loss:>13.3f} {valid:>10.3f} {load:>13.2f} {dropped:>8.3f} {seconds:>6.0f}s")
    print(f"\nplot: {plot(runs, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

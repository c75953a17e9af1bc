"""The paper's comparison as one command: train a set of models on the same data, token budget, schedule and seed,
then plot their losses and tabulate the paper's measure (megamoe.cli.study_report).

    python tools/compare_models.py [--workdir study] [--models mamba moe_mamba ...] [--sweep num_experts=8,32]
                                   [--base CONFIG] [--train-iters N] [--nproc N] [-- megamoe-train flags]

Every model takes all of `--base`'s sections (data, training, optimizer; by default the quickstart's) except its
model section, so only the architecture differs. The built-in models keep the base's width and experts:
    mamba               2N Mamba layers (N = --blocks)
    moe_mamba           N MoE-Mamba blocks (Mamba, then Switch MoE)
    dense_twin          N Mamba + dense FFN blocks, the FFN as wide as one expert: what the MoE adds over it
    transformer         N attention + FFN blocks, the FFN sized so that the active parameters equal Mamba's
    transformer_moe     N attention + Switch MoE blocks, the experts sized the same way
    parallel_moe_mamba  N Parallel MoE-Mamba blocks;  moe_in_mamba  2N Mamba layers, MoE conv and output
                        projections in every other one (not in the default set)
NAME=FILE takes the model section of a YAML file (e.g. examples/paper/moe_mamba_25m.yaml). `--sweep KEY=V1,V2`
adds one variant of each `--sweep-models` model per value (KEY a model key, or section.key).

Each model trains in <workdir>/runs/<name> (megamoe-train with --save and --load there), so an interrupted study
resumes: finished models are not trained again, an unfinished one resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import yaml

from megamoe.checkpoint.folder import latest_name, step_name
from megamoe.cli.quickstart import QUICKSTART_CONFIG, prepare_data
from megamoe.cli.study_report import report
from megamoe.config import ModelConfig, build_config, config_from_dict, load_yaml
from megamoe.data import load_tokenizer
from megamoe.errors import ConfigError, UserError
from megamoe.logging import get_logger
from megamoe.model import count_parameters

log = get_logger()

DEFAULT_MODELS = ("mamba", "moe_mamba", "dense_twin", "transformer", "transformer_moe")
BUILT_IN = DEFAULT_MODELS + ("parallel_moe_mamba", "moe_in_mamba")
MARKER = "study.json"  # in each model's run folder: the config it trains, and whether it finished


def _active(section: dict) -> int:
    """Active parameters per token without embeddings (the vocabulary does not matter)."""
    return count_parameters(config_from_dict({"model": dict(section, vocab_size=128)}).model)["active_non_embedding"]


def width_matching(section: dict, key: str, target: int) -> dict:
    """`section` with `key` (d_ffn or d_expert), a multiple of 64, set so its active parameters come closest to
    `target`: attention blocks are smaller than Mamba's, so their FFN or experts are widened to equal Mamba."""
    d_model = section.get("d_model", ModelConfig.d_model)
    widths = range(64, 16 * d_model + 1, 64)
    best = min(widths, key=lambda w: abs(_active(dict(section, **{key: w})) - target))
    return dict(section, **{key: best})


def built_in_models(base_model: dict, blocks: int) -> dict:
    """The built-in models' model sections, from the base's model section (its width, experts and routing)."""
    moe = {k: v for k, v in base_model.items() if k not in ("pattern", "parallel_moe", "mamba_moe_projections",
                                                             "mamba_moe_every", "d_ffn")}
    dense = {k: v for k, v in moe.items() if not k.startswith(("router_", "moe_")) and k not in (
        "num_experts", "d_expert", "top_k", "capacity_factor", "load_balancing_weight", "z_loss_weight",
        "token_drop_policy", "shared_expert_intermediate_size")}
    d_expert = ModelConfig(**{k: v for k, v in moe.items() if k in ("d_model", "d_expert")}).resolved_d_expert
    mamba = dict(dense, pattern="MM" * blocks)
    target = _active(mamba)
    return {
        "mamba": mamba,
        "moe_mamba": dict(moe, pattern="ME" * blocks),
        "dense_twin": dict(dense, pattern="MF" * blocks, d_ffn=d_expert),
        "transformer": width_matching(dict(dense, pattern="AF" * blocks), "d_ffn", target),
        "transformer_moe": width_matching(dict(moe, pattern="AE" * blocks), "d_expert", target),
        "parallel_moe_mamba": dict(moe, pattern="ME" * blocks, parallel_moe=True),
        "moe_in_mamba": dict(moe, pattern="MM" * blocks, mamba_moe_projections=["conv", "output"],
                             mamba_moe_every=2),
    }


def parse_sweeps(sweeps: list) -> list:
    """--sweep KEY=V1,V2 ... -> [(section, key, [values])], each value parsed as YAML (numbers, booleans)."""
    out = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {sweep!r}: write KEY=V1,V2 (e.g. num_experts=8,16,32)")
        section, _, name = key.rpartition(".")
        out.append((section or "model", name, [yaml.safe_load(v) for v in values.split(",")]))
    return out


def study_models(args, base: dict) -> dict:
    """{name: full config dict} of every model of the study, in order."""
    built = built_in_models(base.get("model", {}), args.blocks)
    models = {}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if sep:
            section = load_yaml(path).get("model")
            if not section:
                raise ConfigError(f"--models {spec}: {path} has no model: section")
        elif name in built:
            section = built[name]
        else:
            raise ConfigError(f"--models {name}: not a built-in model ({', '.join(BUILT_IN)}); give NAME=FILE.yaml "
                              "for a model section of your own")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"--models {spec}: a model name has letters, digits, _ . - only")
        models[name] = dict(copy.deepcopy(base), model=copy.deepcopy(section))
    for section, key, values in parse_sweeps(args.sweep):
        for name in args.sweep_models:
            if name not in models:
                raise ConfigError(f"--sweep-models {name} is not one of --models ({', '.join(models)})")
            for value in values:
                variant = copy.deepcopy(models[name])
                variant.setdefault(section, {})[key] = value
                models[f"{name}-{key}={value}"] = variant
    return models


def _fingerprint(config: dict, extra: list) -> str:
    """What a finished model was trained with: its config without paths, and the extra megamoe-train flags."""
    kept = {k: v for k, v in config.items() if k not in ("checkpoint", "logging")}
    return hashlib.sha256(json.dumps([kept, extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_marker(run_dir: str) -> dict:
    path = os.path.join(run_dir, MARKER)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_marker(run_dir: str, marker: dict) -> None:
    tmp = os.path.join(run_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, MARKER))


def prepare_run(name: str, config: dict, args, extra: list) -> tuple:
    """Write <workdir>/runs/<name>/config.yaml; returns (run folder, Config, marker)."""
    run_dir = os.path.join(args.workdir, "runs", name)
    config = copy.deepcopy(config)
    if args.train_iters:
        config.setdefault("training", {})["train_iters"] = args.train_iters
    iters = config.get("training", {}).get("train_iters", 0)
    ckpt = os.path.join(run_dir, "checkpoints")
    config["checkpoint"] = dict(config.get("checkpoint") or {}, save=ckpt, load=ckpt, keep_last=2,
                                save_interval=args.save_interval or max(1, iters // 4))
    config.setdefault("logging", {})["log_dir"] = run_dir
    fingerprint = _fingerprint(config, extra)
    marker = _read_marker(run_dir)
    if marker and marker.get("fingerprint") != fingerprint:
        if not args.restart:
            raise ConfigError(f"{run_dir} trained model {name} with other settings; pass --restart to train it "
                              "again from scratch, or another --workdir")
        shutil.rmtree(run_dir)
        marker = {}
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "study_config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    cfg = build_config(path, extra)
    cfg.validate(args.nproc, check_files=False)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    cfg.model.vocab_size = cfg.model.padded_vocab_size(tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size,
                                                       cfg.data.tokenizer_model)
    return run_dir, cfg, dict(marker or {"name": name, "finished": False}, fingerprint=fingerprint,
                              parameters=count_parameters(cfg.model))


def train_model(run_dir: str, args, extra: list) -> int:
    """megamoe-train on this study's config for one model, in --nproc processes; its progress lines go through."""
    config = os.path.join(run_dir, "study_config.yaml")
    train = ["-m", "megamoe.cli.train", "--config", config, *extra]
    if args.launcher:  # e.g. srun over a Slurm allocation's nodes, for multi-node models
        cmd = [*shlex.split(args.launcher), "--config", config, *extra]
    elif args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               *train]
    else:
        cmd = [sys.executable, *train]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                          str(max(1, (os.cpu_count() or 1) // args.nproc))))
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
        log.error(f"training {run_dir} failed (exit {rc}); rerun it alone with: {' '.join(cmd)}")
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="study", help="runs/<model>/, study.png, study.md, study.json")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="built-in names or NAME=FILE.yaml")
    parser.add_argument("--reference", help="the model whose final smoothed loss the others race to (default: "
                                            "mamba if it is in the study, else the first model)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="variants of --sweep-models, one per value (repeatable)")
    parser.add_argument("--sweep-models", nargs="+", default=["moe_mamba"])
    parser.add_argument("--base", default=QUICKSTART_CONFIG, help="the YAML every model takes all but model: from")
    parser.add_argument("--blocks", type=int, default=4, help="N of the built-in models' patterns")
    parser.add_argument("--train-iters", type=int, help="default: the base's")
    parser.add_argument("--save-interval", type=int, help="checkpoints for resuming (default: train_iters / 4)")
    parser.add_argument("--data-path", help="a preprocessed prefix (default: the quickstart corpus, prepared in "
                                            "--workdir)")
    parser.add_argument("--tokenizer-model", help="with --data-path")
    parser.add_argument("--nproc", type=int, default=1, help="processes per model (torchrun) when above 1; layout "
                                                             "flags go after --")
    parser.add_argument("--launcher", help="the command that runs megamoe-train on many nodes, e.g. \"srun python -m "
                                            "megamoe.cli.train\" (it gets --config and the flags after --)")
    parser.add_argument("--restart", action="store_true", help="retrain models whose settings changed")
    return parser


def run_study(args, extra: list) -> int:
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    if bool(args.data_path) != bool(args.tokenizer_model):
        raise ConfigError("--data-path and --tokenizer-model go together (or give neither: the quickstart corpus)")
    if args.data_path:
        data, tokenizer = args.data_path, args.tokenizer_model
    else:
        data, tokenizer = prepare_data(args.workdir, workers=2)
    base = load_yaml(args.base)
    base["data"] = dict(base.get("data") or {}, data_path=[data], tokenizer_model=tokenizer)
    base.pop("parallel", None)  # the layout goes after --, the same for every model
    models = study_models(args, base)
    reference = args.reference or ("mamba" if "mamba" in models else next(iter(models)))
    if reference not in models:
        raise ConfigError(f"--reference {reference} is not one of the study's models ({', '.join(models)})")
    runs = {name: prepare_run(name, config, args, extra) for name, config in models.items()}
    failed = []
    for i, (name, (run_dir, cfg, marker)) in enumerate(runs.items(), 1):
        counts = marker["parameters"]
        head = (f"[{i}/{len(runs)}] {name}: {cfg.model.pattern}, {counts['active_non_embedding'] / 1e6:.2f}M active "
                f"of {counts['total_non_embedding'] / 1e6:.2f}M (without embeddings), {cfg.training.train_iters} steps")
        if marker.get("finished"):
            log.info(f"{head}: finished earlier in {run_dir}, not trained again")
            continue
        log.info(f"{head}: training in {run_dir}" + (" (resuming)" if os.path.exists(os.path.join(
            run_dir, "checkpoints", "latest")) else ""))
        _write_marker(run_dir, marker)
        start = time.perf_counter()
        if train_model(run_dir, args, extra):
            failed.append(name)
            continue
        saved = latest_name(os.path.join(run_dir, "checkpoints"))
        if saved != step_name(cfg.training.train_iters):  # a signal, --exit-duration-in-mins: the job is ending
            log.error(f"{name} stopped early ({saved or 'no checkpoint'} of {cfg.training.train_iters} steps); "
                      "rerun the same command to resume the study")
            return 1
        _write_marker(run_dir, dict(marker, finished=True, seconds=marker.get("seconds", 0.0)
                                    + time.perf_counter() - start))
    done = {name: run for name, run in runs.items() if name not in failed}
    if reference in done:
        paths = report({name: (run_dir, cfg, marker["parameters"]) for name, (run_dir, cfg, marker) in done.items()},
                       reference, args.workdir)
        log.info(f"study: table {paths['markdown']} (and {paths['json']}), plot {paths['plot']}")
        with open(paths["markdown"]) as f:
            print(f.read())
    if failed:
        log.error(f"not finished: {', '.join(failed)}; fix what their errors say and rerun the same command (the "
                  "finished models are kept)")
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        return run_study(args, extra)
    except UserError as e:
        print(f"compare_models: error: {e}", file=sys.stderr)
        return 2

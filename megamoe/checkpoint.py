"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, train state, RNG, config.

Layout of `--save DIR`:
    DIR/iter_0000300/          one complete checkpoint (DCP shards + .metadata, megamoe.json,
                               config.yaml, rng_rank<r>.pt)
    DIR/latest                 the name of the newest complete checkpoint, written last

A checkpoint is written into DIR/.tmp_iter_*, verified, and renamed: a crash while saving leaves only a
temporary folder that `--load` never takes. megamoe.json is written after every shard, so a folder
without it is incomplete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megamoe.config import Config
from megamoe.parallel.random import get_rng_state, set_rng_state

MARKER = "megamoe.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _step_name(step: int) -> str:
    return f"iter_{step:07d}"


def resolve(path: str) -> str:
    """A checkpoint folder from `path`: the folder itself, or the one a `latest` marker in it names."""
    if not os.path.exists(path):
        raise CheckpointError(f"--load: {path} does not exist")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"--load: {path} is not a complete megamoe checkpoint ({MARKER} is missing; "
                              "a save that did not finish, or not a checkpoint folder)")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"--load: {os.path.join(path, '.metadata')} is missing; the checkpoint is damaged")
    return path


def read_marker(path: str) -> dict:
    with open(os.path.join(resolve(path), MARKER)) as f:
        return json.load(f)


def save(root: str, model, optimizer, state, cfg: Config, topo) -> str:
    """Save a checkpoint of `state.step` under `root`; returns the final folder."""
    name = _step_name(state.step)
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp_{name}")
    if topo.is_rank0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    torch.save(get_rng_state(), os.path.join(tmp, f"rng_rank{topo.rank}.pt"))
    _barrier()
    if topo.is_rank0:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
        marker = dict(format_version=FORMAT_VERSION, step=state.step, world_size=topo.world_size,
                      layout=dict(tp=topo.tp, pp=topo.pp, ep=topo.ep, dp=topo.dp),
                      train_state=dataclasses.asdict(state), model=dataclasses.asdict(cfg.model))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
        _prune(root, cfg.checkpoint.keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last) -> None:
    if not keep_last:
        return
    done = sorted(d for d in os.listdir(root) if d.startswith("iter_"))
    for old in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def check_model_config(marker: dict, cfg: Config, path: str) -> None:
    saved, current = marker["model"], dataclasses.asdict(cfg.model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}"
             for k in current if k in saved and saved[k] != current[k]]
    if diffs:
        raise CheckpointError(f"--load: {path} was saved with a different model config: " + "; ".join(diffs))


def load(path: str, model, optimizer, cfg: Config, topo):
    """Load model (and optimizer, when given) in place; returns the saved TrainState."""
    from megamoe.training.trainer import TrainState

    path = resolve(path)
    marker = read_marker(path)
    check_model_config(marker, cfg, path)
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer else (model.state_dict(), None)
    to_load = {"model": model_sd} if optimizer is None else {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(to_load, checkpoint_id=path)
    except Exception as e:  # DCP's own errors name keys, not the file
        raise CheckpointError(f"--load: reading {path} failed: {e}") from e
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optimizer"])
    else:
        model.load_state_dict(to_load["model"])
    rng = os.path.join(path, f"rng_rank{topo.rank}.pt")
    if os.path.isfile(rng) and marker["world_size"] == topo.world_size:
        set_rng_state(torch.load(rng, weights_only=False))
    state = marker["train_state"]
    state["history"] = [tuple(h) for h in state.get("history", [])]
    return TrainState(**state)


def load_config(path: str) -> Config:
    """The full config a checkpoint was saved with."""
    from megamoe.config import config_from_dict
    with open(os.path.join(resolve(path), "config.yaml")) as f:
        return config_from_dict(yaml.safe_load(f))

"""Loading a checkpoint into this rank's model (and optimizer, train state, generators), in any layout.

Every rank checks what it can and the problems are shared, so no rank waits in a collective for one that gave up;
a damaged or mismatched checkpoint fails with the file and the problem.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megamoe.checkpoint.boxes import (
    OPTIM,
    gather_all,
    model_entries,
    param_names,
    rank_and_world,
    read_entries,
    read_metadata,
    state_boxes,
)
from megamoe.checkpoint.folder import MARKER, check_files, check_storage, raise_if, read_marker, resolve
from megamoe.checkpoint.saving import layout_of
from megamoe.config import Config
from megamoe.errors import CheckpointError
from megamoe.parallel.random import set_rng_state


def check_model_config(marker: dict, cfg: Config, path: str) -> None:
    """Fail when the model config differs from the one the checkpoint was saved with."""
    saved, current = marker["model"], dataclasses.asdict(cfg.model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}"
             for k in current if k in saved and saved[k] != current[k]]
    if diffs:
        hint = ""
        if "vocab_size" in " ".join(diffs):
            hint = (f" (the padded vocabulary depends on TP; pass --model.vocab_size {saved.get('vocab_size')} "
                    "to load it in this layout)")
        raise CheckpointError(f"--load: {os.path.join(path, MARKER)} was saved with a different model config: "
                              + "; ".join(diffs) + hint)


def _check_targets(entries: dict, metadata, path: str) -> list:
    """Problems of loading `entries` from `metadata`: missing keys, other shapes, boxes not fully saved."""
    problems, saved = [], metadata.state_dict_metadata
    for key, entry in entries.items():
        md = saved.get(key)
        if md is None or not hasattr(md, "chunks"):
            problems.append(f"{path} has no tensor {key}")
            continue
        if tuple(md.size) != tuple(entry.global_shape):
            problems.append(f"{key}: checkpoint shape {tuple(md.size)} vs model {tuple(entry.global_shape)}")
            continue
        for _, glob, size in entry.boxes:
            covered = 0
            for chunk in md.chunks:
                overlap = 1
                for g, s, o, n in zip(glob, size, chunk.offsets, chunk.sizes):
                    overlap *= max(0, min(g + s, o + n) - max(g, o))
                covered += overlap
            if covered != torch.Size(size).numel():
                problems.append(f"{key}: the box at {glob} of size {size} is not fully saved in {path}")
    return problems


def _optimizer_targets(model, optimizer, cfg: Config, topo, metadata, path: str) -> tuple:
    """Fresh state tensors for the parameters this rank's optimizer steps, as Boxes to read into."""
    names = param_names(model, optimizer, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # ZeRO-1: the ones this rank owns
    saved: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(OPTIM):
            fqn, _, k = key[len(OPTIM):].rpartition(".")
            saved.setdefault(fqn, {})[k] = md
    entries, states, problems = {}, {}, []
    for p in params:
        fqn = names[id(p)]
        if fqn not in saved:
            problems.append(f"{path} has no optimizer state for {fqn}")
            continue
        states[p] = {}
        for k, md in sorted(saved[fqn].items()):
            shape = tuple(p.shape) if len(md.size) else ()
            t = torch.zeros(shape, dtype=md.properties.dtype, device=p.device if shape else "cpu")
            states[p][k] = t
            entries[f"{OPTIM}{fqn}.{k}"] = state_boxes(t, p, topo, f"{OPTIM}{fqn}.{k}")
    return entries, states, problems


def _apply_optimizer_state(optimizer, states: dict, marker: dict) -> None:
    sd = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    sd["state"] = {index[id(p)]: st for p, st in states.items()}
    for group, saved in zip(sd["param_groups"], marker.get("optimizer_groups", [])):
        if "step" in group and "step" in saved:  # optimizers that count steps per group (apex FusedAdam)
            group["step"] = saved["step"]
    optimizer.load_state_dict(sd)


def load(path: str, model, optimizer, cfg: Config, topo, state=None, verify: bool = True,
         rng: Optional[bool] = None) -> dict:
    """Load a checkpoint (or `path`'s latest) into this rank's model, and optimizer when given, in any layout;
    `state.load_state_dict` gets the saved train state, which is also returned (a dict). Every rank calls it.
    verify: check file sizes and CRC32s first. rng: restore the random generators; by default when resuming (an
    optimizer given), while a model-only load (inference, export) leaves the caller's alone."""
    path = resolve(path)
    marker = read_marker(path)
    check_model_config(marker, cfg, path)
    if optimizer is not None and not marker.get("optimizer", True):
        raise CheckpointError(f"--load: {path} holds no optimizer state (saved model-only); add --no-load-optim "
                              "to resume with a new optimizer, or --finetune to start over from its weights")
    # Every rank checks what it can and the problems are shared, so no rank waits in a collective for
    # one that gave up.
    problems, entries, states = check_files(path, marker.get("files", {}), topo, checksums=verify), {}, {}
    try:
        metadata = read_metadata(path)
        problems += check_storage(path, metadata)
        entries = model_entries(model, cfg, topo)
        problems += _check_targets(entries, metadata, path)
        if optimizer is not None:
            opt_entries, states, opt_problems = _optimizer_targets(model, optimizer, cfg, topo, metadata, path)
            problems += opt_problems + _check_targets(opt_entries, metadata, path)
            entries.update(opt_entries)
    except CheckpointError as e:
        problems.append(str(e))
    raise_if([p for part in gather_all(problems, topo) for p in part], f"--load: {path} cannot be loaded")
    with torch.no_grad():
        read_entries(path, entries, topo)
    if optimizer is not None:
        _apply_optimizer_state(optimizer, states, marker)
    if optimizer is not None if rng is None else rng:  # by default with the optimizer, else as told
        rank = rank_and_world(topo)[0]
        same_layout = {"cp": 1, **marker.get("layout", {})} == layout_of(topo)  # older saves record no cp
        rng_file = os.path.join(path, f"rng_rank{rank if same_layout else 0}.pt")
        if os.path.isfile(rng_file):  # every rank draws the same streams (parallel/random.py): rank 0's fit any
            set_rng_state(torch.load(rng_file, weights_only=False))
    if state is not None:
        state.load_state_dict(marker["train_state"])
    return marker["train_state"]

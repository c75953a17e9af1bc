"""Saving a checkpoint, now or in the background (--async-save), with the same guarantees either way.

    save(root, model, optimizer, state, cfg, topo) -> folder            every rank calls it
    pending = save_async(root, model, optimizer, state, cfg, topo)      returns once the tensors are copied
    pending.wait() -> folder                                           before the next save, and at the end

Both write root/.tmp_iter_*, verify it (sizes, CRC32s), write megamoe.json into it last, rename it and only then
point `latest` at it (folder.finalize): a kill at any moment leaves the previous `latest` loadable. In the
background, torch.distributed.checkpoint's async_save writes a CPU copy of the tensors (boxes.BoxStager) in its
thread and a second thread finalizes; both talk over a process group of their own (Topology.background_group),
so their collectives never meet training's. A save that fails (a full disk) removes its temporary folder and
raises CheckpointError naming the problem and the checkpoint that is still intact.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import threading
from typing import Optional

import torch

from megamoe.checkpoint.boxes import (
    BoxStager,
    model_entries,
    optimizer_entries,
    rank_and_world,
    write_entries,
    write_entries_async,
)
from megamoe.checkpoint.folder import FORMAT_VERSION, barrier, finalize, latest_name, new_tmp, remove_tmp, step_name
from megamoe.config import Config
from megamoe.errors import CheckpointError
from megamoe.parallel.random import get_rng_state


def layout_of(topo) -> dict:
    """The parallel layout recorded in megamoe.json (a single process when topo is None)."""
    if topo is None:
        return dict(tp=1, pp=1, ep=1, etp=1, cp=1, dp=1, world_size=1)
    return dict(tp=topo.tp, pp=topo.pp, ep=topo.ep, etp=topo.etp, cp=topo.cp, dp=topo.dp,
                world_size=topo.world_size)


def _begin(root: str, model, optimizer, state, cfg: Config, topo) -> tuple:
    """The new checkpoint's temporary folder holding its small files (this rank's RNG, rank 0's config), and
    (name, folder, DCP entries, marker without the file table)."""
    train_state = state.state_dict()
    name = step_name(train_state["step"])
    tmp = new_tmp(root, name, topo)
    entries = model_entries(model, cfg, topo)
    if optimizer is not None:
        entries.update(optimizer_entries(model, optimizer, cfg, topo))
    torch.save(get_rng_state(), os.path.join(tmp, f"rng_rank{rank_and_world(topo)[0]}.pt"))
    if rank_and_world(topo)[0] == 0:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
    groups = [] if optimizer is None else [
        {k: v for k, v in g.items() if k != "params" and isinstance(v, (bool, int, float, str, type(None)))}
        for g in optimizer.param_groups]
    marker = dict(format_version=FORMAT_VERSION, step=train_state["step"], train_state=train_state,
                  model=dataclasses.asdict(cfg.model), layout=layout_of(topo), optimizer=optimizer is not None,
                  optimizer_groups=groups, saved_at=datetime.datetime.now().isoformat(timespec="seconds"),
                  torch=torch.__version__)
    return name, tmp, entries, marker


def _failed(root: str, tmp: str, error: BaseException, topo) -> CheckpointError:
    remove_tmp(tmp, topo)
    kept = latest_name(root)
    intact = (f"the previous checkpoint {os.path.join(root, kept)} is intact" if kept else
              "no earlier checkpoint exists")
    return CheckpointError(f"saving a checkpoint in {root} failed ({error}); {intact}; free space or fix the "
                           "folder, then resume with --load")


def save(root: str, model, optimizer, state, cfg: Config, topo) -> str:
    """Save model, optimizer state, train state (`state.state_dict()`), RNG and config of that state's step under
    `root` (every rank calls it); returns the final folder."""
    name, tmp, entries, marker = _begin(root, model, optimizer, state, cfg, topo)
    try:
        write_entries(tmp, entries, topo)
        barrier(topo)
        return finalize(root, tmp, name, marker, topo, cfg.checkpoint.keep_last)
    except (CheckpointError, OSError) as e:
        raise _failed(root, tmp, e, topo) from None


class PendingSave:
    """A checkpoint being written in the background. `wait()` returns its folder once it is complete (verified,
    renamed, named by `latest`), or raises the CheckpointError of a save that failed."""

    def __init__(self, future, root: str, tmp: str, name: str, marker: dict, topo, keep_last, group):
        self.root, self.step = root, marker["step"]
        self.folder: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._finish, name="megamoe-checkpoint", daemon=True,
                                        args=(future, tmp, name, marker, topo, keep_last, group))
        self._thread.start()

    def _finish(self, future, tmp, name, marker, topo, keep_last, group) -> None:
        try:
            future.result()
            self.folder = finalize(self.root, tmp, name, marker, topo, keep_last, group)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at wait()
            self._error = _failed(self.root, tmp, e, topo)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.folder


def save_async(root: str, model, optimizer, state, cfg: Config, topo, stager: Optional[BoxStager] = None
               ) -> PendingSave:
    """`save`, the writing in the background: returns once every tensor is copied to CPU memory. `stager`: the
    copies of the previous save, refilled (pass the same one to every save of a run)."""
    name, tmp, entries, marker = _begin(root, model, optimizer, state, cfg, topo)
    group = topo.background_group() if rank_and_world(topo)[1] > 1 else None
    try:
        future = write_entries_async(tmp, entries, topo, group, stager or BoxStager())
    except (CheckpointError, OSError) as e:
        raise _failed(root, tmp, e, topo) from None
    return PendingSave(future, root, tmp, name, marker, topo, cfg.checkpoint.keep_last, group)

"""Checkpoint folders: names, the `latest` marker, megamoe.json, verification, the atomic rename, pruning.

    DIR/iter_0000300/     .metadata + __<rank>_0.distcp (DCP), rng_rank<r>.pt, config.yaml,
                          megamoe.json (step, train state, model config, layout, file sizes and CRC32s)
    DIR/latest            the name of the newest complete checkpoint, replaced atomically, written last

A save writes DIR/.tmp_iter_*, verifies it, writes megamoe.json into it last and renames it; then `latest`.
A kill at any point leaves `latest` naming the previous complete checkpoint, and `resolve` refuses folders
without megamoe.json and temporary ones.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib

import yaml

from megamoe.checkpoint.boxes import barrier, gather_all, rank_and_world, read_metadata
from megamoe.config import Config, config_from_dict
from megamoe.errors import CheckpointError, ConfigError

MARKER = "megamoe.json"
LATEST = "latest"
TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"
FORMAT_VERSION = 2


def step_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(root: str) -> list:
    """Complete checkpoint folders under `root`, oldest first."""
    names = [d for d in os.listdir(root) if d.startswith("iter_") and os.path.isfile(os.path.join(root, d, MARKER))]
    return sorted(names, key=lambda d: int(d[5:]) if d[5:].isdigit() else -1)


def _unneeded_old_copy(path: str) -> bool:
    """An .old_<name> folder that is not the copy `latest` still needs (see finalize)."""
    root, base = os.path.split(os.path.normpath(path))
    if not base.startswith(OLD_PREFIX):
        return False
    name = base[len(OLD_PREFIX):]
    return latest_name(root) != name or os.path.isdir(os.path.join(root, name))


def latest_name(root: str):
    """The checkpoint `root/latest` names, or None."""
    latest = os.path.join(root, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def holds_checkpoint(path: str) -> bool:
    """Whether `path` is, or (as a --save folder) holds, anything `resolve` would take or reject: a `latest`
    marker, a complete checkpoint, or a checkpoint's marker. A folder with only a killed first save's temporary
    folder holds none."""
    if not os.path.isdir(path):
        return False
    return (os.path.isfile(os.path.join(path, LATEST)) or os.path.isfile(os.path.join(path, MARKER))
            or bool(complete_checkpoints(path)))


def remove_tmp(tmp: str, topo) -> None:
    """Rank 0 removes the temporary folder of a save that failed (a full disk gets its space back)."""
    if rank_and_world(topo)[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(path: str) -> str:
    """A complete checkpoint folder from `path`: the folder itself, or the one its `latest` marker names."""
    if not os.path.exists(path):
        raise CheckpointError(f"--load: {path} does not exist")
    if os.path.basename(os.path.normpath(path)).startswith(TMP_PREFIX) or _unneeded_old_copy(path):
        raise CheckpointError(f"--load: {path} is the temporary folder of a save that did not finish; "
                              f"load {os.path.dirname(os.path.normpath(path))} (its {LATEST} checkpoint) instead")
    latest, name = os.path.join(path, LATEST), latest_name(path)
    if name is not None:
        target, old = os.path.join(path, name), os.path.join(path, OLD_PREFIX + name)
        if not os.path.isdir(target) and os.path.isfile(os.path.join(old, MARKER)):
            target = old  # killed while saving the same step again, between finalize's two renames
        if not os.path.isdir(target):
            raise CheckpointError(f"--load: {latest} names {name!r}, which does not exist in {path} "
                                  f"(complete checkpoints there: {complete_checkpoints(path) or 'none'})")
        path = target
    elif not os.path.isfile(os.path.join(path, MARKER)) and os.path.isdir(path):
        done = complete_checkpoints(path)
        if done:
            raise CheckpointError(f"--load: {path} has no {LATEST} marker; load one of its complete checkpoints "
                                  f"explicitly: {', '.join(os.path.join(path, d) for d in done)}")
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"--load: {os.path.join(path, MARKER)} is missing: {path} is not a complete megamoe "
                              "checkpoint (a save that did not finish, or not a checkpoint folder)")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"--load: {os.path.join(path, '.metadata')} is missing; the checkpoint is damaged")
    return path


def read_marker(path: str) -> dict:
    """megamoe.json of a checkpoint: step, train state, model config, layout, files."""
    marker = os.path.join(resolve(path), MARKER)
    try:
        with open(marker) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker} cannot be read ({e}); the checkpoint is damaged") from e
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format version {data['format_version']} is newer than this megamoe's "
                              f"{FORMAT_VERSION}; upgrade megamoe")
    return data


def load_config(path: str) -> Config:
    """The full (resolved) config checkpoint `path` (or a --save folder's latest) was saved with; CheckpointError
    when it cannot be read."""
    path = resolve(path)
    try:
        with open(os.path.join(path, "config.yaml")) as f:
            return config_from_dict(yaml.safe_load(f))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"--load: the config of {path} cannot be read ({e}); the checkpoint is damaged or "
                              "from another megamoe version") from None


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_table(folder: str, topo, group=None) -> dict:
    """{file: [size, crc32]} of every file of `folder` but the marker; the ranks share the hashing."""
    rank, world = rank_and_world(topo)
    files = sorted(f for f in os.listdir(folder) if f != MARKER and os.path.isfile(os.path.join(folder, f)))
    mine = {f: [os.path.getsize(os.path.join(folder, f)), _crc32(os.path.join(folder, f))]
            for f in files[rank::world]}
    table = {}
    for part in gather_all(mine, topo, group):
        table.update(part)
    return table


def check_files(folder: str, table: dict, topo, checksums: bool = True) -> list:
    """Problems with the files `table` records (missing, wrong size, wrong CRC32); ranks split the work."""
    rank, world = rank_and_world(topo)
    problems = []
    for name in sorted(table)[rank::world]:
        size, crc = table[name]
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, the checkpoint recorded {size} "
                            "(truncated or overwritten)")
        elif checksums and _crc32(full) != crc:
            problems.append(f"{full} is corrupted (its CRC32 differs from the one recorded at save)")
    return problems


def check_storage(folder: str, metadata) -> list:
    """Problems with the shard files DCP's metadata points into (missing, shorter than their records)."""
    need = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(need.items()):
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif os.path.getsize(full) < size:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, fewer than the {size} its records need "
                            "(truncated)")
    return problems


def raise_if(problems: list, what: str) -> None:
    problems = sorted(set(problems))
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{what}: " + "; ".join(problems[:8]) + more)


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def finalize(root: str, tmp: str, name: str, marker: dict, topo, keep_last=None, group=None) -> str:
    """Verify `tmp`, write its marker, rename it to root/name, point `latest` at it, prune (rank 0 renames).
    `group`: the process group of a background save."""
    metadata = read_metadata(tmp)
    raise_if(check_storage(tmp, metadata), f"verifying the new checkpoint {tmp} failed")
    marker = dict(marker, files=file_table(tmp, topo, group))
    final = os.path.join(root, name)
    if rank_and_world(topo)[0] == 0:
        _fsync_write(os.path.join(tmp, MARKER), json.dumps(marker, indent=1))
        old = os.path.join(root, OLD_PREFIX + name)
        if os.path.exists(final):  # saving a step again: keep the old copy until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _write_latest(root, name)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, name)
    barrier(topo, group)
    return final


def _write_latest(root: str, name: str) -> None:
    _fsync_write(os.path.join(root, LATEST + ".tmp"), name)
    os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))


def _prune(root: str, keep_last, current: str) -> None:
    if not keep_last:
        return
    for old in [d for d in complete_checkpoints(root) if d != current][:-keep_last + 1 or None]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def new_tmp(root: str, name: str, topo) -> str:
    """An empty temporary folder for checkpoint `name`; stale ones of killed saves are removed."""
    tmp = os.path.join(root, TMP_PREFIX + name)
    if rank_and_world(topo)[0] == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):
            stale = d.startswith(TMP_PREFIX) or _unneeded_old_copy(os.path.join(root, d))
            if stale and os.path.isdir(os.path.join(root, d)):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        os.makedirs(tmp)
    barrier(topo)
    return tmp

"""Offline work on a checkpoint, in one CPU process with no process group: read whole tensors, re-shard to
another layout, describe it.

A checkpoint loads into any layout as it is (every rank reads the parts of the saved chunks its boxes need).
`reshard` rewrites it so that its stored chunks are exactly the boxes of a target layout (TP2 EP2 -> TP1 EP4:
each rank of the target reads one chunk per tensor), after checking that the target divides the model. How each
parameter splits is the sharding plan (megamoe/parallel/plan.py), the table the live parallelize reads too.
"""
from __future__ import annotations

import copy
import math
import os
import shutil

import torch

from megamoe.checkpoint.boxes import MODEL, OPTIM, Boxes, read_entries, read_metadata, write_entries
from megamoe.checkpoint.folder import finalize, load_config, new_tmp, read_marker, resolve, step_name
from megamoe.errors import CheckpointError, ConfigError
from megamoe.parallel.plan import layout_boxes


def read_tensors(path: str, prefix: str = MODEL) -> dict:
    """{key without prefix: whole tensor} of every saved tensor whose key starts with `prefix`, on CPU."""
    path = resolve(path)
    metadata = read_metadata(path)
    entries = {k: Boxes.whole(torch.empty(tuple(md.size), dtype=md.properties.dtype))
               for k, md in metadata.state_dict_metadata.items() if k.startswith(prefix) and hasattr(md, "chunks")}
    read_entries(path, entries)
    return {k[len(prefix):]: e.local for k, e in entries.items()}


def check_layout(path: str, tp: int = 1, pp: int = 1, ep: int = 1, etp=None, dp=None):
    """The checkpoint's config with the target layout, validated (every size divides what it splits).
    dp None: the fewest data-parallel replicas the expert grid needs."""
    return layout_config(load_config(path), path, tp, pp, ep, etp, dp)


def layout_config(cfg, where: str, tp: int = 1, pp: int = 1, ep: int = 1, etp=None, dp=None):
    """(a copy of `cfg` with the target layout, dp), validated against its model; `where` names it in errors."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.expert_model_parallel_size, p.expert_tensor_parallel_size = ep, etp
    if dp is None:
        dp = math.lcm(tp * pp, p.resolved_etp * ep * pp) // (tp * pp)
    try:
        p.validate(tp * pp * dp, cfg.model)  # the pipeline stages too
    except ConfigError as e:
        raise CheckpointError(f"target layout for {where}: {e}") from e
    return cfg, dp


def reshard(path: str, output: str, tp: int = 1, pp: int = 1, ep: int = 1, etp=None, dp=None) -> str:
    """Rewrite checkpoint `path` as output/iter_<step> whose chunks are the boxes of the target layout;
    model, optimizer state, train state and config are carried over. Returns the new folder."""
    path = resolve(path)
    cfg, dp = check_layout(path, tp, pp, ep, etp, dp)
    marker = read_marker(path)
    files = [os.path.join(path, f) for f in ("config.yaml", "rng_rank0.pt")  # every rank draws the same streams
             if os.path.isfile(os.path.join(path, f))]
    new = dict(marker, converted_from=dict(path=os.path.abspath(path), layout=marker.get("layout")))
    return write_layout(output, cfg, read_tensors(path, MODEL), read_tensors(path, OPTIM), new, dp, files)


def write_layout(output: str, cfg, model: dict, optim: dict, marker: dict, dp: int, files=(),
                 texts=None) -> str:
    """Write output/iter_<marker step>: the whole tensors `model` ({name: tensor}) and `optim` ({name.key:
    tensor}) stored as the boxes of cfg.parallel's layout (checked by layout_config), `files` copied and `texts`
    ({file name: text}) written beside them, `marker` with the layout. Returns the new folder."""
    p = cfg.parallel
    tp, pp, ep, etp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size,
                       p.resolved_etp)
    entries = {}
    for key, t in list((MODEL + k, v) for k, v in model.items()) + list((OPTIM + k, v) for k, v in optim.items()):
        name = key[len(MODEL):] if key.startswith(MODEL) else key[len(OPTIM):].rpartition(".")[0]
        if t.dim() == 0 or (key.startswith(OPTIM) and model[name].shape != t.shape):
            entries[key] = Boxes.whole(t)
            continue
        boxes = layout_boxes(name, tuple(t.shape), cfg.model, tp, ep, etp)
        entries[key] = Boxes(t, tuple(t.shape), [(glob, glob, size) for glob, size in boxes])
    name = step_name(marker["step"])
    tmp = new_tmp(output, name, None)
    write_entries(tmp, entries)
    for f in files:
        shutil.copy(f, os.path.join(tmp, os.path.basename(f)))
    for f, text in (texts or {}).items():
        with open(os.path.join(tmp, f), "w") as out:
            out.write(text)
    layout = dict(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, world_size=tp * pp * dp)
    new = dict(marker, layout=layout)
    new.pop("files", None)
    return finalize(output, tmp, name, new, None)


def inspect(path: str) -> str:
    """A readable summary: step, train state, layout, model, files, and every tensor's global shape and
    how many chunks it was saved in."""
    path = resolve(path)
    marker = read_marker(path)
    metadata = read_metadata(path)
    lay = marker.get("layout", {})
    state = marker.get("train_state", {})
    m = marker.get("model", {})
    files = marker.get("files", {})
    lines = [f"checkpoint {path}",
             f"step {marker.get('step')}, consumed samples {state.get('consumed_train_samples')}, saved "
             f"{marker.get('saved_at', '?')} with torch {marker.get('torch', '?')}",
             f"saved layout: TP {lay.get('tp')} x PP {lay.get('pp')} x EP {lay.get('ep')} (ETP {lay.get('etp')}) "
             f"x DP {lay.get('dp')} on {lay.get('world_size')} ranks (loads into any layout)"]
    if "converted_from" in marker:
        lines.append(f"converted from {marker['converted_from']['path']}")
    lines.append(f"model: pattern {m.get('pattern')}, d_model {m.get('d_model')}, vocab {m.get('vocab_size')}, "
                 f"{m.get('num_experts')} experts, tie_embeddings {m.get('tie_embeddings')}")
    lines.append(f"optimizer state: {'yes' if marker.get('optimizer') else 'no'}; files: {len(files)}, "
                 f"{sum(s for s, _ in files.values()) / 2 ** 20:.2f} MiB")
    numel = 0
    rows = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if not hasattr(md, "chunks"):
            continue
        shape = tuple(md.size)
        numel += torch.Size(shape).numel() if key.startswith(MODEL) else 0
        rows.append((key, str(md.properties.dtype).replace("torch.", ""), str(shape), len(md.chunks)))
    lines.append(f"tensors: {len(rows)} ({numel / 1e6:.3f}M model parameters)")
    width = max((len(r[0]) for r in rows), default=0)
    lines += [f"  {k:<{width}}  {d:<8} {s:<18} {c} chunk{'s' if c > 1 else ''}" for k, d, s, c in rows]
    return "\n".join(lines)

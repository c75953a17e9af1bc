"""Checkpoints with torch.distributed.checkpoint (DCP), free of the parallel layout they were saved in.

    save(root, model, optimizer, state, cfg, topo) -> folder     every rank calls it (saving.py)
    save_async(...) -> PendingSave; .wait() -> folder            the same, written in the background
    load(path, model, optimizer, cfg, topo, state) -> dict       any layout; optimizer=None: model only (loading.py)
    resolve(path), read_marker(path), load_config(path), holds_checkpoint(path), CheckpointError

`state` is the training loop's state (step, consumed samples, ...): any object with `state_dict()` (a dict of
plain values holding "step") and `load_state_dict(d)`, handed in by the caller, so this package never imports
the training code (torchtitan hands its checkpointer `states={"train_state": ...}` the same way).

Every tensor is stored by its global name and shape, each rank writing the boxes of it that it holds and
reading back the boxes it needs (boxes.py), so a checkpoint saved with one TP/PP/EP/DP layout loads into any
other. Keys (those torch.distributed.checkpoint.state_dict gives an unsharded model):
    model.<name>                     model.layers.<global block index>.mixer.in_proj.weight, ...
    optimizer.state.<name>.<key>     exp_avg, exp_avg_sq (boxes as their parameter), step (a scalar)
With tied embeddings only `embedding.weight` is stored; a last pipeline stage's `lm_head.weight` copy is
saved and loaded as it. Optimizer state is saved for, and loaded into, the parameters the rank's optimizer
holds (with ZeRO-1, the ones the rank owns; the owners of all ranks together cover every parameter).
Beside the DCP files: rng_rank<r>.pt, config.yaml (the resolved config) and megamoe.json (step, train state,
model config, layout, file sizes and CRC32s), written last; folder.py makes the save atomic. Offline
conversion and inspection: convert.py; export to one safetensors file: export.py; Hugging Face transformers folders:
hf_export.py (the remote code it ships: hf_modeling/, never imported by megamoe) and hf_import.py.
"""
from megamoe.checkpoint.boxes import (
    MODEL,
    OPTIM,
    Boxes,
    BoxStager,
    canonical_name,
    model_entries,
    optimizer_entries,
    param_boxes,
    read_entries,
    read_metadata,
    write_entries,
)
from megamoe.checkpoint.folder import (
    LATEST,
    MARKER,
    complete_checkpoints,
    holds_checkpoint,
    latest_name,
    load_config,
    read_marker,
    resolve,
)
from megamoe.checkpoint.loading import check_model_config, load
from megamoe.checkpoint.saving import PendingSave, layout_of, save, save_async
from megamoe.errors import CheckpointError

__all__ = ["BoxStager", "Boxes", "CheckpointError", "LATEST", "MARKER", "MODEL", "OPTIM", "PendingSave",
           "canonical_name", "check_model_config", "complete_checkpoints", "holds_checkpoint", "latest_name",
           "layout_of", "load", "load_config", "model_entries", "optimizer_entries", "param_boxes", "read_entries",
           "read_marker", "read_metadata", "resolve", "save", "save_async", "write_entries"]

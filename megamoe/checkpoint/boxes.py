"""Tensors as boxes of their global tensors, written and read with torch.distributed.checkpoint (DCP).

A rank's parameter shard is a `Boxes`: the local tensor and, per box, its offsets in the local and the global
tensor (parallel/sharding.ShardSpec.regions). `_BoxSavePlanner` turns each box into one DCP write item keyed
by (name, global offsets): DCP's global plan then de-duplicates replicas (the same box proposed by several
ranks is written once) and checks that the chunks of every tensor tile it exactly. `_BoxLoadPlanner` asks,
for each box a rank needs, for the overlapping parts of whatever chunks were saved: any layout reads any other.

ShardedTensor was not used: it validates that its shards neither overlap nor leave gaps, which replicated
shards (TP-replicated norms, DP copies) break; DTensor needs one device mesh per placement, which Mamba's
[x | z] in_proj split and the EP x ETP expert grid do not fit. The planner API is DCP's extension point, and
the files it writes are plain DCP checkpoints (torch.distributed.checkpoint.format_utils reads them).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import AsyncStager

from megamoe.config import Config
from megamoe.errors import CheckpointError
from megamoe.parallel.sharding import shard_spec

MODEL, OPTIM = "model.", "optimizer.state."


@dataclass
class Boxes:
    """`local` holds the boxes [(local_offsets, global_offsets, sizes)] of a tensor of `global_shape`."""

    local: torch.Tensor
    global_shape: tuple
    boxes: list

    @classmethod
    def whole(cls, t: torch.Tensor) -> "Boxes":
        zero = (0,) * t.dim()
        return cls(t, tuple(t.shape), [(zero, zero, tuple(t.shape))])

    def view(self, i: int) -> torch.Tensor:
        local, _, size = self.boxes[i]
        return self.local[tuple(slice(o, o + s) for o, s in zip(local, size))]


def param_boxes(p: torch.Tensor, topo) -> Boxes:
    """Where this rank's parameter `p` (or a tensor shaped like it) sits in its global tensor."""
    spec = shard_spec(p)
    t = p.detach()
    if spec is None:
        return Boxes.whole(t)
    if getattr(p, "is_expert", False):
        regions = spec.regions(topo.etp_rank, topo.etp, topo.ep_rank, topo.ep)
    else:
        regions = spec.regions(topo.tp_rank, topo.tp)
    return Boxes(t, tuple(spec.global_shape), regions)


def canonical_name(name: str, cfg: Config) -> str:
    """The global name of a parameter: a tied LM head (the last stage's copy under PP) is the embedding."""
    return "embedding.weight" if cfg.model.tie_embeddings and name == "lm_head.weight" else name


def _named_tensors(model, cfg: Config) -> dict:
    """{global name: tensor} of parameters and persistent buffers, each shared tensor once."""
    out, seen = {}, set()
    buffers = dict(model.named_buffers())
    for name, t in list(model.named_parameters()) + [(n, buffers[n]) for n in model.state_dict() if n in buffers]:
        key = canonical_name(name, cfg)
        if id(t) not in seen and key not in out:
            seen.add(id(t))
            out[key] = t
    return out


def model_entries(model, cfg: Config, topo) -> dict:
    """{"model.<name>": Boxes} of this rank's model (views of the parameters: loading writes in place)."""
    return {MODEL + name: param_boxes(t, topo) for name, t in _named_tensors(model, cfg).items()}


def state_boxes(value: torch.Tensor, p: torch.Tensor, topo, key: str) -> Boxes:
    """Boxes of an optimizer state tensor of parameter `p`: as `p` when shaped like it, whole when a scalar."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"optimizer state {key} is a {type(value).__name__}, not a tensor; only tensor "
                              "state (AdamW's exp_avg, exp_avg_sq, step) can be checkpointed")
    if value.shape == p.shape:
        return dataclasses.replace(param_boxes(p, topo), local=value.detach())
    if value.dim() == 0:
        return Boxes.whole(value.detach())
    raise CheckpointError(f"optimizer state {key} has shape {tuple(value.shape)}, neither the parameter's "
                          f"{tuple(p.shape)} nor a scalar")


def param_names(model, optimizer, cfg: Config) -> dict:
    """{id(parameter): global name} of the model, checking that the optimizer steps only model parameters."""
    names = {id(p): canonical_name(n, cfg) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter that is not in the model")
    return names


def optimizer_entries(model, optimizer, cfg: Config, topo) -> dict:
    """{"optimizer.state.<name>.<key>": Boxes} of the state this rank's optimizer holds (ZeRO: its own)."""
    names = param_names(model, optimizer, cfg)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                key = f"{OPTIM}{names[id(p)]}.{k}"
                out[key] = state_boxes(v, p, topo, key)
    return out


class _BoxSavePlanner(DefaultSavePlanner):
    """One write item per box; the default global plan de-duplicates replicas and checks coverage."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator = state_dict, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, entry in self.state_dict.items():
            props = TensorProperties.create_from_tensor(entry.local)
            for _, glob, size in entry.boxes:
                chunk = ChunkStorageMetadata(offsets=torch.Size(glob), sizes=torch.Size(size))
                items.append(WriteItem(index=MetadataIndex(key, torch.Size(glob)), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk, properties=props,
                                                                   size=torch.Size(entry.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        entry = self.state_dict[write_item.index.fqn]
        for i, (_, glob, _) in enumerate(entry.boxes):
            if torch.Size(glob) == write_item.index.offset:
                return entry.view(i).detach()
        raise KeyError(write_item.index)


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Read items that fill each local box from whichever saved chunks overlap it."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, entry in self.state_dict.items():
            chunks = [ChunkStorageMetadata(torch.Size(g), torch.Size(s)) for _, g, s in entry.boxes]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        entry = self.state_dict[read_item.dest_index.fqn]
        box = entry.view(read_item.dest_index.index)
        return box[tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths))]


def rank_and_world(topo) -> tuple:
    """(rank, world size) of the collective a save/load runs over; a single process without topo."""
    if topo is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier(topo, group=None) -> None:
    """Every rank of the save / load waits for the others (`group`: a background save's own group)."""
    if rank_and_world(topo)[1] > 1:
        dist.barrier(group=group)


def gather_all(obj, topo, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if rank_and_world(topo)[1] == 1:
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj, group=group)
    return every


def _failures(e: BaseException) -> str:
    """DCP's error as one line: each failing rank and its error (DCP names ranks and keys, not the folder)."""
    failures = getattr(e, "failures", {})
    return "; ".join(f"rank {r}: {type(f).__name__} {f}" for r, f in failures.items()) or f"{type(e).__name__} {e}"


def write_entries(path: str, entries: dict, topo=None, group=None) -> None:
    """Write {key: Boxes} of every rank (collectively, over `group` when given) as one DCP checkpoint in `path`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.save(entries, checkpoint_id=path, planner=_BoxSavePlanner(), process_group=group,
                     no_dist=rank_and_world(topo)[1] == 1)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"writing {path} failed: {_failures(e)}") from e


class BoxStager(AsyncStager):
    """dcp.async_save's staging for Boxes: a CPU copy of every local tensor (pinned for a GPU's), so training
    can change the parameters and optimizer state while the copy is written. The copies are kept and refilled by
    the next save (one save is in flight at a time): fresh buffers would cost a page fault per 4 KiB each time."""

    _synchronize_after_execute = False

    def __init__(self):
        self.buffers: dict = {}

    def stage(self, state_dict: dict) -> dict:
        return {key: dataclasses.replace(entry, local=self._copy(key, entry.local))
                for key, entry in state_dict.items()}

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self.buffers[key] = buf
        return buf.copy_(t)


def write_entries_async(path: str, entries: dict, topo, group, stager: BoxStager):
    """Start writing {key: Boxes} as one DCP checkpoint in `path` in DCP's background thread, over `group` (a
    process group of its own, so its collectives never meet training's); returns the Future of the write once
    `stager` has copied the entries to CPU memory."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return dcp.async_save(entries, checkpoint_id=path, planner=_BoxSavePlanner(), process_group=group,
                              async_stager=stager, no_dist=rank_and_world(topo)[1] == 1)


def read_entries(path: str, entries: dict, topo=None) -> None:
    """Fill {key: Boxes} from the DCP checkpoint in `path` (collectively when topo spans ranks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(entries, checkpoint_id=path, planner=_BoxLoadPlanner(), no_dist=rank_and_world(topo)[1] == 1)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"reading {path} failed: {_failures(e)}") from e


def read_metadata(path: str):
    """DCP's metadata (every key's global size, dtype and saved chunks) of a checkpoint folder."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{os.path.join(path, '.metadata')} cannot be read ({type(e).__name__}: {e}); "
                              "the checkpoint is damaged") from e

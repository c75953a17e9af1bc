"""Helpers the tests share: run a function on N gloo ranks, and assemble full tensors from every rank's shards.

    results = run_on_ranks(fn, world_size=2, args=(...), timeout=120)
    full = full_tensors({name: param}, topo, grads=False)     the global tensors, on every rank

`fn(*args)` runs in N fresh processes (forked from a forkserver, a clean process that has imported torch,
megatron-core and megamoe once, so nothing of the parent's thread pools or CUDA state is inherited and no rank
spends seconds on imports) with the caller's environment at the time of the call and torchrun's variables set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so it can call `megamoe.parallel.init_distributed`
exactly as a real run does. Returns each rank's return value, in rank order. When a rank raises, the error names
the rank and shows its traceback; when the timeout passes, every process is killed and the error says which
ranks had not finished.

full_tensors: each rank writes its regions (sharding.ShardSpec) into a zero tensor of the global shape; one
all-reduce over the world sums them and a second counts how many ranks wrote each element, so replicas average
out. Simple and layout-agnostic, for checks; checkpoints go through torch.distributed.checkpoint.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from megamoe.parallel.sharding import ShardSpec, shard_spec
from megamoe.parallel.topology import destroy_distributed, free_port


class RankFailure(RuntimeError):
    """A rank raised, or ranks did not finish in time."""


# Imported once by the forkserver; every rank forks from it (these imports take ~8 s of CPU per process).
PRELOAD = ["torch", "megatron.core", "megamoe.checkpoint", "megamoe.parallel.parallelize", "megamoe.training",
           "megamoe.testing"]


def _rank_main(fn, args, rank, world_size, port, threads, results, env):
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(threads)
        # Pickled here, by value: the queue's own pickler would share each tensor's memory through this process,
        # which may have exited by the time the parent unpickles it.
        value = pickle.dumps(fn(*args))
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit from a CLI under test
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy_distributed()
        except Exception:
            pass


def run_on_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 180,
                 threads_per_rank: int = 1) -> list:
    """Run `fn(*args)` on `world_size` spawned ranks; return their results in rank order."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (the first call)
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, tuple(args), r, world_size, port, threads_per_rank, results, env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankFailure(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailure(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                      "without reporting (killed, or crashed in native code)")
                continue
            if not ok:
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{value}")
            outcomes[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcomes) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcomes[r] for r in range(world_size)]


def _ranks(p, topo) -> tuple:
    expert = getattr(p, "is_expert", False)
    return (topo.etp_rank if expert else topo.tp_rank, topo.etp if expert else topo.tp,
            topo.ep_rank if expert else 0, topo.ep if expert else 1)


def full_tensors(named: dict, topo, grads: bool = False) -> dict:
    """{name: parameter} of this rank (any pipeline stage) -> {name: full tensor} on every rank, on CPU.
    With grads=True, the parameters' gradients instead (zeros where a parameter has none)."""
    names = sorted(named)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, {n: (shard_spec(named[n]) or ShardSpec(tuple(named[n].shape)),
                                           str(named[n].dtype)) for n in names})
        specs = {}
        for d in every:
            specs.update(d)
        names = sorted(specs)
    else:
        specs = {n: (shard_spec(named[n]) or ShardSpec(tuple(named[n].shape)), str(named[n].dtype)) for n in names}
    out = {}
    for name in names:
        spec, _ = specs[name]
        total = torch.zeros(spec.global_shape, dtype=torch.float64, device=topo.device)
        count = torch.zeros(spec.global_shape, dtype=torch.float64, device=topo.device)
        p = named.get(name)
        if p is not None:
            local = p.grad if grads else p
            local = torch.zeros_like(p) if local is None else local
            for loc, glob, size in spec.regions(*_ranks(p, topo)):
                src = local.detach()[tuple(slice(o, o + s) for o, s in zip(loc, size))]
                dst = tuple(slice(o, o + s) for o, s in zip(glob, size))
                total[dst] += src.double()
                count[dst] += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        out[name] = (total / count.clamp(min=1)).float().cpu()
    return out

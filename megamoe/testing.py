"""Run a function on N gloo ranks of this machine: the harness of every multi-process test.

    results = run_on_ranks(fn, world_size=2, args=(...), timeout=120)

`fn(*args)` runs in N fresh processes (spawned, so nothing of the parent's thread pools or CUDA state is
inherited) with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
it can call `megamoe.parallel.init_distributed` exactly as a real run does. Returns each rank's return
value, in rank order. When a rank raises, the error names the rank and shows its traceback; when the
timeout passes, every process is killed and the error says which ranks had not finished.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from megamoe.parallel.topology import free_port


class RankFailure(RuntimeError):
    """A rank raised, or ranks did not finish in time."""


def _rank_main(fn, args, rank, world_size, port, threads, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        torch.set_num_threads(threads)
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit from a CLI under test
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megamoe.parallel.topology import destroy_distributed
            destroy_distributed()
        except Exception:
            pass


def run_on_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 180,
                 threads_per_rank: int = 1) -> list:
    """Run `fn(*args)` on `world_size` spawned ranks; return their results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, tuple(args), r, world_size, port, threads_per_rank, results),
                         daemon=True) for r in range(world_size)]
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
            outcomes[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcomes) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcomes[r] for r in range(world_size)]

"""A dead or hung rank is told within a bounded time, on every launcher.

A rank that dies (OOM-killed, a node gone) or hangs (a stuck device) leaves the others waiting in their next
collective until the distributed timeout (30 minutes by default), and srun without --kill-on-bad-exit may leave
them there for the whole job. Here each rank bumps a counter in the rendezvous store every `timeout / 8` seconds
from a thread and watches its successor's (rank + 1 mod world: O(world) store traffic, as opposed to everyone
watching everyone); a counter that has not moved for `timeout` seconds means that rank is gone. Its watcher
writes the verdict under one key that every rank reads at each beat, and every survivor logs it and exits with
status 1: torchrun then restarts the job (elastic restarts resume from the newest checkpoint), Slurm ends the job
step. A rank that finishes cleanly marks itself done, so its watcher stops waiting for it.

torch.distributed has no such check for gloo (the NCCL watchdog only fires when a collective times out), so it
is written here, on the store every launcher already provides.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

from megamoe.logging import get_logger
from megamoe.parallel.topology import Topology, store_client

log = get_logger()

GONE_KEY = "gone"
EXIT_STATUS = 1


class Heartbeat:
    """Each rank's beat in the store, and the watch over its successor's; `stop()` marks this rank done."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float, describe_store: str = "",
                 on_gone: Optional[Callable[[str], None]] = None):
        self.store, self.rank, self.world, self.timeout = store, rank, world_size, float(timeout)
        self.interval = max(0.05, self.timeout / 8)
        self.describe_store = describe_store
        self.on_gone = on_gone or _exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megamoe-heartbeat", daemon=True)
        self.watched = (rank + 1) % world_size

    def start(self) -> "Heartbeat":
        self.store.set(f"beat/{self.rank}", f"0 {socket.gethostname()}")
        self._thread.start()
        return self

    def stop(self, done: bool = True) -> None:
        """Stop beating. `done`: this rank ends cleanly, and its watcher stops waiting for it; otherwise (an
        error on this rank alone, say) its silence tells the others within the timeout."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        if done:
            try:
                self.store.set(f"beat/{self.rank}", "done")
            except Exception:  # noqa: BLE001 - the store may already be gone at the very end of a job
                pass

    def _run(self) -> None:
        beats, last_value, last_change, watching = 0, None, time.monotonic(), True
        while not self._stop.wait(self.interval):
            try:
                beats += 1
                self.store.set(f"beat/{self.rank}", f"{beats} {socket.gethostname()}")
                if self.store.check([GONE_KEY]):
                    return self._gone(self.store.get(GONE_KEY).decode())
                if watching:
                    key = f"beat/{self.watched}"
                    value = self.store.get(key).decode() if self.store.check([key]) else None
            except Exception as e:  # noqa: BLE001 - any failure to reach the store means its host is gone
                if self._stop.is_set():
                    return
                return self._gone(f"the rendezvous store{self.describe_store} stopped answering "
                                  f"({type(e).__name__}: {e}); the process that holds it (rank 0, or the launcher "
                                  "of node 0) is gone")
            if not watching:
                continue
            if value == "done":  # it finished: keep beating for the rank that watches this one
                watching = False
                continue
            now = time.monotonic()
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.timeout:
                host = value.split(" ", 1)[1] if value and " " in value else "?"
                verdict = (f"rank {self.watched} (host {host}) stopped answering {now - last_change:.0f} s ago: it "
                           f"died or hangs (parallel.heartbeat_timeout_seconds {self.timeout:g}); noticed by rank "
                           f"{self.rank}")
                try:
                    self.store.set(GONE_KEY, verdict)
                except Exception:  # noqa: BLE001
                    pass
                return self._gone(verdict)

    def _gone(self, verdict: str) -> None:
        if self._stop.is_set():
            return
        log.error(f"rank {self.rank}: {verdict}; exiting (status {EXIT_STATUS}) so the launcher can restart the job")
        self.on_gone(verdict)


def start_heartbeat(topo: Topology, timeout: float) -> Optional[Heartbeat]:
    """This rank's heartbeat over the job's rendezvous store, or None for one process or `timeout` 0."""
    if topo.world_size == 1 or timeout <= 0:
        return None
    store = store_client(topo.env, datetime.timedelta(seconds=timeout))
    where = f" at {topo.env.master_addr}:{topo.env.master_port}"
    return Heartbeat(dist.PrefixStore("heartbeat/", store), topo.rank, topo.world_size, timeout, where).start()


def _exit(verdict: str) -> None:
    os._exit(EXIT_STATUS)  # the main thread may be blocked in a collective that would wait for the dead rank

"""The heartbeat tells a silent rank within its timeout, leaves a live or finished one alone, and names a store
that stopped answering (in one process: the ranks' heartbeats share an in-memory store)."""
import time

import torch.distributed as dist

from megamoe.parallel.heartbeat import Heartbeat


def _wait_for(verdicts: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not verdicts and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_silent_rank_is_named_within_the_timeout():
    verdicts = []
    start = time.monotonic()
    beat = Heartbeat(dist.HashStore(), 0, 2, timeout=0.5, on_gone=verdicts.append).start()  # rank 1 never beats
    _wait_for(verdicts, 5)
    beat.stop()
    assert verdicts and verdicts[0].startswith("rank 1 (host ?) stopped answering")
    assert time.monotonic() - start < 2.0


def test_live_and_finished_ranks_are_left_alone_and_a_verdict_reaches_everyone():
    store, verdicts = dist.HashStore(), []
    beats = [Heartbeat(store, r, 3, timeout=0.5, on_gone=verdicts.append).start() for r in range(3)]
    time.sleep(1.5)  # three timeouts of beating: nobody is gone
    beats[1].stop(done=True)  # rank 1 finished: rank 0, its watcher, stops waiting for it
    time.sleep(1.0)
    assert verdicts == []
    beats[2].stop(done=False)  # rank 2 fails alone: rank 1 is done, so nobody watches it but the verdict key
    store.set("gone", "rank 2 (host h) stopped answering")  # what its watcher would write
    _wait_for(verdicts, 3)
    beats[0].stop()
    assert verdicts == ["rank 2 (host h) stopped answering"]


class _BrokenStore:
    def set(self, key, value):
        raise RuntimeError("Connection reset by peer")


def test_a_store_that_stops_answering_is_reported():
    verdicts = []
    store = dist.HashStore()
    beat = Heartbeat(store, 0, 2, timeout=0.4, describe_store=" at h:1", on_gone=verdicts.append).start()
    beat.store = _BrokenStore()
    _wait_for(verdicts, 3)
    assert verdicts and "the rendezvous store at h:1 stopped answering (RuntimeError: Connection reset" in verdicts[0]

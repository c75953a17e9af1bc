"""Continuous batching: a fixed number of slots (the rows of one InferenceCache) decode together; requests wait
in a queue, and a sequence that finishes (eod, a stop string, max_tokens) frees its slot for the next one.

    engine  = Engine(model, slots=8, eod=tok.eod, vocab_size=tok.vocab_size, decode=tok.decode)
    request = engine.submit(Request(ids, max_tokens=64, temperature=0.8, top_p=0.95, seed=1, stop=("\\n\\n",)))
    engine.run()                      step until every submitted request is done; or serve_forever() in a thread
    request.tokens, request.text, request.finish_reason

Each step first prefills waiting requests into the free slots (generation.prefill: from empty states, so a reused
slot starts exactly as a fresh one) and samples their first token from the prompt's logits, then decodes one token
for every busy slot in one batched call. Idle slots ride along in that call (their rows are emptied after it: a
Mamba row zeroed, a KV row's length reset, its stale keys masked out). Each request samples with its own generator
(seeded: reproducible draws of its own), so every request gets what it would get alone (generation.generate).

Tensor parallelism (a model larger than one device): the engine runs on TP rank 0, and the other TP ranks run
follow(model, slots). Before each model or cache call (a prefill, a decode step, a release of rows) the engine
broadcasts it, and every follower makes the same call on its shards and its own cache, so each TP collective is
met by every rank and the caches stay alike row for row; only rank 0 samples (its tokens go out with the next
step). While idle the engine sends a keep-alive, so the followers' wait never reaches the collective timeout.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megamoe.errors import InferenceError
from megamoe.inference.generation import allocate_cache, check_model, forward_cached, prefill, sample, tp_group

KEEPALIVE_SECONDS = 60.0  # an idle tensor-parallel engine tells its followers it is alive this often


class _Calls:
    """The engine's model and cache calls, broadcast first to the other TP ranks (their follow() makes them too)."""

    def __init__(self, model, cache):
        self.model, self.cache, self.group = model, cache, tp_group(model)
        self.closed = False

    def _tell(self, *command) -> None:
        if self.group is None:
            return
        if self.closed:  # the followers have returned: a collective now would wait for ever
            raise InferenceError("this tensor-parallel engine is closed (its followers have stopped); make a new one")
        dist.broadcast_object_list([command], src=dist.get_global_rank(self.group, 0), group=self.group)

    def prefill(self, rows: list, prompts: list) -> torch.Tensor:
        self._tell("prefill", rows, prompts)
        return prefill(self.model, self.cache, rows, prompts)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            self._tell("decode", tokens.tolist())
        return forward_cached(self.model, tokens, self.cache, last_only=True)[:, -1]

    def release(self, rows: list) -> None:
        self._tell("release", rows)
        self.cache.release(rows)

    def keepalive(self) -> None:
        self._tell("keepalive")

    def close(self) -> None:
        if not self.closed:
            self._tell("stop")
            self.closed = True

    def follow(self) -> None:
        src = dist.get_global_rank(self.group, 0)
        device = self.model.embedding.weight.device
        while True:
            command = [None]
            dist.broadcast_object_list(command, src=src, group=self.group)
            kind, *args = command[0]
            if kind == "stop":
                return
            if kind == "prefill":
                prefill(self.model, self.cache, *args)
            elif kind == "decode":
                forward_cached(self.model, torch.tensor(args[0], device=device), self.cache, last_only=True)
            elif kind == "release":
                self.cache.release(args[0])


def follow(model, slots: int) -> None:
    """The side of a tensor-parallel Engine on TP ranks other than 0: make the model calls the engine broadcasts
    (on a cache of the same `slots`), until it stops (Engine.close, or the end of serve_forever)."""
    check_model(model)
    group = tp_group(model)
    if group is None or dist.get_rank(group) == 0:
        raise InferenceError("follow() runs on the TP ranks other than 0 of a tensor-parallel model; rank 0 runs "
                             "the Engine")
    _Calls(model, allocate_cache(model, slots)).follow()


@dataclass
class Request:
    """One prompt to continue, its sampling parameters, and (filled in by the engine) what it produced."""

    prompt: list
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None  # its own generator; None: torch's global one
    stop: tuple = ()  # strings that end it (they need the engine's decode), cut off the text
    on_update: Optional[Callable] = None  # called with the request after each token and once done (engine thread)
    tokens: list = field(default_factory=list)  # the new ids, ending with eod if it came
    text: str = ""  # their text without eod, cut at the first stop string (with the engine's decode)
    finish_reason: Optional[str] = None  # "stop" (eod or a stop string), "length", "cancelled", "error"
    error: Optional[str] = None
    cancelled: bool = False
    _generator: Optional[torch.Generator] = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the engine has finished it; False on timeout."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Ask the engine to drop it at its next step (a client went away)."""
        self.cancelled = True


def check_request(request: Request, vocab: int) -> None:
    """InferenceError, one line, for a request the engine cannot run."""
    prompt = request.prompt
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InferenceError("the prompt is empty; give at least one token (e.g. the tokenizer's eod)")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
        raise InferenceError(f"prompt token ids must be integers in [0, {vocab})")
    checks = (("max_tokens", request.max_tokens, int, lambda v: v >= 0, ">= 0"),
              ("temperature", request.temperature, (int, float), lambda v: v >= 0, ">= 0 (0: greedy)"),
              ("top_k", request.top_k, int, lambda v: v >= 1, ">= 1"),
              ("top_p", request.top_p, (int, float), lambda v: 0 < v <= 1, "in (0, 1]"),
              ("seed", request.seed, int, lambda v: True, "an integer"))
    for name, value, kind, ok, want in checks:
        if value is None and name not in ("max_tokens", "temperature"):
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise InferenceError(f"{name}={value!r} must be {want}")
    if not isinstance(request.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in request.stop):
        raise InferenceError(f"stop={request.stop!r} must be a list of non-empty strings")


class Engine:
    """`slots` sequences decoding at once from one queue of Requests (see the module docstring).

    eod: the id that ends a sequence; vocab_size: only ids below it are produced (the tokenizer's size);
    decode: ids -> text, for Request.text and stop strings; max_length: the most tokens (prompt + max_tokens) a
    request may have (None: no limit). KV caches grow as their longest row does."""

    def __init__(self, model, slots: int = 8, eod: Optional[int] = None, vocab_size: Optional[int] = None,
                 decode: Optional[Callable] = None, max_length: Optional[int] = None):
        check_model(model)
        group = tp_group(model)
        if group is not None and dist.get_rank(group) != 0:
            raise InferenceError("a tensor-parallel Engine runs on TP rank 0; the other TP ranks call "
                                 "follow(model, slots)")
        if slots < 1:
            raise InferenceError(f"slots={slots} must be >= 1")
        self.model, self.eod, self.vocab_size, self.decode = model, eod, vocab_size, decode
        self.max_length = max_length
        self.device = model.embedding.weight.device
        self.cache = allocate_cache(model, slots)
        self.calls = _Calls(model, self.cache)  # every model and cache call goes through it (TP: broadcast)
        self.slots: list = [None] * slots  # the Request each row decodes, None when free
        self.next_tokens = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._waiting: deque = deque()
        self._lock = threading.Condition()
        self._stopping = False

    def submit(self, request: Request) -> Request:
        """Queue a request (from any thread); InferenceError for bad parameters."""
        check_request(request, self.model.cfg.vocab_size)
        if request.stop and self.decode is None:
            raise InferenceError("stop strings need text: give the Engine a decode function")
        if self.max_length is not None and len(request.prompt) + request.max_tokens > self.max_length:
            raise InferenceError(f"the prompt's {len(request.prompt)} tokens + max_tokens {request.max_tokens} "
                                 f"exceed the engine's max_length {self.max_length}; shorten the prompt or "
                                 "lower max_tokens")
        if request.seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self.slots)

    def run(self, requests: tuple = ()) -> list:
        """Submit `requests`, then step until nothing is left; returns them."""
        for request in requests:
            self.submit(request)
        while self.busy:
            self.step()
        return list(requests)

    def step(self) -> None:
        """Admit waiting requests into free slots, then decode one token for every busy slot."""
        for row, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self._finish(row, request, "cancelled")
        self._admit()
        busy = [row for row, request in enumerate(self.slots) if request is not None]
        if not busy:
            return
        logits = self.calls.decode(self.next_tokens)
        idle = [row for row, request in enumerate(self.slots) if request is None]
        if idle:
            self.calls.release(idle)
        self._emit(busy, logits[busy] if idle else logits)

    def _admit(self) -> None:
        free = [row for row, request in enumerate(self.slots) if request is None]
        new = []
        with self._lock:
            while free and self._waiting:
                request = self._waiting.popleft()
                if request.cancelled or request.max_tokens == 0:
                    self._finish(None, request, "cancelled" if request.cancelled else "length")
                    continue
                new.append((free.pop(0), request))
        if not new:
            return
        rows = [row for row, _ in new]
        for row, request in new:
            self.slots[row] = request
        self._emit(rows, self.calls.prefill(rows, [list(r.prompt) for _, r in new]))

    def _emit(self, rows: list, logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits with its request's parameters, and record it."""
        if self.vocab_size is not None:
            logits[:, self.vocab_size:] = float("-inf")
        requests = [self.slots[row] for row in rows]
        greedy = logits.argmax(dim=-1)
        chosen = [greedy[i] if r.temperature == 0 else
                  sample(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r._generator)[0]
                  for i, r in enumerate(requests)]
        tokens = torch.stack(chosen)
        self.next_tokens[rows, 0] = tokens
        for row, request, token in zip(rows, requests, tokens.tolist()):
            request.tokens.append(token)
            reason = self._stopped(request, token)
            if reason:
                self._finish(row, request, reason)
            elif request.on_update:
                request.on_update(request)

    def _stopped(self, request: Request, token: int) -> Optional[str]:
        """Why the request ends after `token` (None: it goes on); sets its text."""
        if self.decode is not None:
            request.text = self.decode([t for t in request.tokens if t != self.eod])
            cuts = [request.text.find(s) for s in request.stop if s in request.text]
            if cuts:
                request.text = request.text[:min(cuts)]
                return "stop"
        if token == self.eod:
            return "stop"
        return "length" if len(request.tokens) >= request.max_tokens else None

    def _finish(self, row: Optional[int], request: Request, reason: str, error: Optional[str] = None) -> None:
        request.finish_reason, request.error = reason, error
        if row is not None:
            self.slots[row] = None
            self.calls.release([row])
        if request.on_update:
            request.on_update(request)
        request._done.set()

    def serve_forever(self) -> None:
        """Step while there is work, wait while there is none, until shutdown() (which cancels what is left). A
        failing step fails the requests it held (finish_reason "error") and the engine goes on with the next."""
        while True:
            with self._lock:
                while not self._stopping and not self.busy:
                    if not self._lock.wait(KEEPALIVE_SECONDS if self.calls.group is not None else None):
                        self.calls.keepalive()
                if self._stopping:
                    for row, request in enumerate(self.slots):
                        if request is not None:
                            self._finish(row, request, "cancelled")
                    self.close()
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - reported to every request it touched, never lost
                message = f"{type(e).__name__}: {e}"
                for row, request in enumerate(self.slots):
                    if request is not None:
                        self._finish(row, request, "error", message)
                self.calls.release(list(range(len(self.slots))))

    def close(self) -> None:
        """Release the followers of a tensor-parallel engine (their follow() returns); serve_forever does it when
        it stops. Nothing to do in one process."""
        self.calls.close()

    def shutdown(self) -> None:
        """Stop serve_forever after its current step; waiting and running requests are cancelled."""
        with self._lock:
            self._stopping = True
            while self._waiting:
                self._finish(None, self._waiting.popleft(), "cancelled")
            self._lock.notify_all()

"""An OpenAI-compatible completion server in front of the continuous-batching engine (engine.py).

    server = CompletionServer(engine, tokenizer, "my-model", host="127.0.0.1", port=8000)
    server.serve_forever()            POST /v1/completions, GET /v1/models; server.close() from another thread

One engine thread decodes every request; each HTTP connection gets a handler thread that checks the body, submits
one engine Request per prompt and waits for them (streaming: sends each new piece of text as a server-sent event).
A client that disconnects cancels its requests, streaming or not, so their slots go to the next ones.
Concurrent HTTP requests thus decode together in the engine's slots, and each prompt gets what it gets alone.

The HTTP layer is the standard library's ThreadingHTTPServer: the handlers only parse JSON and wait on the engine
(the batching happens there), so an async framework would add a dependency without serving requests better.

Fields of POST /v1/completions: prompt (a string, a list of strings, or token ids: a list of ints or of lists of
ints), max_tokens (16), temperature (1; 0: greedy), top_p, top_k, stop (a string or a list), stream, seed (every
prompt of the request samples with it, so each gives what it gives alone with that seed), model (the served
name, if given). Errors are HTTP 4xx with {"error": {"message", "type": "invalid_request_error", "param"}}.
"""
from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from megamoe.errors import InferenceError
from megamoe.inference.engine import Engine, Request

# accepted for compatibility when they ask for nothing beyond what the server does: field -> allowed values
NO_OPS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None,), "presence_penalty": (0, 0.0),
          "frequency_penalty": (0, 0.0), "suffix": (None,), "user": None, "stream_options": None}
POLL_SECONDS = 0.1  # how often a handler waiting for a completion checks that its client is still there


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, the offending field `param`, and what to do instead."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _number(body: dict, name: str, default, kind, ok, want: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise RequestError(f"{name}: {json.dumps(value)} must be {want}", name)
    return value


def parse_prompts(prompt, tokenizer) -> list:
    """Prompt(s) of a request as lists of token ids (an empty string starts a new document: eod)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt: give a string, a non-empty list of strings, or token ids (a list of ints or "
                           "a list of lists of ints)", "prompt")
    ids = []
    for p in prompt:
        if isinstance(p, str):
            ids.append(tokenizer.encode(p) or [tokenizer.eod])
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < tokenizer.vocab_size for t in p):
                raise RequestError(f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
            ids.append(p)
        else:
            raise RequestError(f"prompt: {json.dumps(p)[:40]} is neither a string nor a non-empty list of token "
                               "ids", "prompt")
    return ids


def parse_completion(body, tokenizer, model_name: str) -> tuple:
    """(prompts as ids, Request keyword arguments, stream) from a /v1/completions body; RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object, e.g. {\"prompt\": \"Hello\", \"max_tokens\": 16}")
    known = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed"}
    for name, value in body.items():
        if name in NO_OPS:
            if NO_OPS[name] is not None and value not in NO_OPS[name] and value is not None:
                raise RequestError(f"{name}: {json.dumps(value)} is not supported; leave it out", name)
        elif name not in known:
            raise RequestError(f"{name}: unknown field; the server takes {', '.join(sorted(known))}", name)
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"model: {json.dumps(model)} is not served here; use \"{model_name}\" (GET /v1/models)",
                           "model", 404)
    if "prompt" not in body:
        raise RequestError("prompt: missing; give the text to continue", "prompt")
    prompts = parse_prompts(body["prompt"], tokenizer)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: give a non-empty string or a list of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(f"stream: {json.dumps(stream)} must be true or false", "stream")
    top_p = _number(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")
    params = dict(max_tokens=_number(body, "max_tokens", 16, int, lambda v: v >= 1, "an integer >= 1"),
                  temperature=float(_number(body, "temperature", 1.0, (int, float), lambda v: v >= 0,
                                            "a number >= 0 (0: greedy)")),
                  top_p=None if top_p == 1 else float(top_p),
                  top_k=_number(body, "top_k", None, int, lambda v: v >= 1, "an integer >= 1"),
                  seed=_number(body, "seed", None, int, lambda v: True, "an integer"), stop=tuple(stop))
    return prompts, params, bool(stream)


def _safe_text(text: str, stop: tuple) -> str:
    """What of a growing text can be sent already: without a trailing part of a stop string or of a character
    (U+FFFD: bytes of a character still to come), which later tokens may cut or complete."""
    keep = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    text = text[:keep]
    return text.rstrip("\ufffd")


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server (see the module docstring); it starts the engine's thread, close() stops both."""

    daemon_threads = True

    def __init__(self, engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())
        super().__init__((host, port), CompletionHandler)
        self.engine_thread = threading.Thread(target=engine.serve_forever, name="engine", daemon=True)
        self.engine_thread.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop serving (call from another thread than serve_forever's), then the engine."""
        self.shutdown()
        self.server_close()
        self.engine.shutdown()
        self.engine_thread.join(30)


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature; quiet by default
        pass

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: Optional[str] = None,
                    kind: str = "invalid_request_error") -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's name
        if self.path.rstrip("/") != "/v1/models":
            return self._send_error(404, f"{self.path}: no such endpoint; use POST /v1/completions or "
                                         "GET /v1/models")
        self._send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": self.server.created, "owned_by": "megamoe"}]})

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/v1/completions":
            return self._send_error(404, f"POST {self.path}: no such endpoint; use POST /v1/completions")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"the body is not valid JSON ({e}); send a JSON object with Content-Type "
                                   "application/json")
            prompts, params, stream = parse_completion(body, self.server.tokenizer, self.server.model_name)
            events = queue.Queue() if stream else None
            requests = self._submit(prompts, params, events)
        except RequestError as e:
            return self._send_error(e.status, str(e), e.param)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        if stream:
            return self._stream(requests, events, meta)
        for request in requests:
            while not request.wait(POLL_SECONDS):
                if self._client_gone():  # nobody will read the answer: free the engine's slots for others
                    for r in requests:
                        r.cancel()
                    return
        failed = [r for r in requests if r.finish_reason in ("error", "cancelled")]
        if failed:
            status, message = (500, failed[0].error) if failed[0].error else (503, "the server is shutting down")
            return self._send_error(status, message, kind="server_error")
        choices = [{"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(requests)]
        used = sum(len(p) for p in prompts), sum(len(r.tokens) for r in requests)
        self._send_json(200, {**meta, "choices": choices, "usage": {
            "prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)}})

    def _submit(self, prompts: list, params: dict, events: Optional[queue.Queue] = None) -> list:
        """One engine Request per prompt, its updates (index, text, finish_reason) into `events`; a refused
        one (too long, ...) withdraws those already submitted."""
        longest = self.server.engine.max_length
        for ids in prompts if longest else ():
            if len(ids) >= longest:
                raise RequestError(f"prompt: {len(ids)} tokens; the server takes at most {longest - 1} (with "
                                   "max_tokens, at most --max-length tokens in all); shorten it", "prompt")
            if len(ids) + params["max_tokens"] > longest:
                raise RequestError(f"max_tokens: {params['max_tokens']} after a prompt of {len(ids)} tokens; "
                                   f"at most {longest - len(ids)} fit in the server's --max-length {longest}",
                                   "max_tokens")
        requests = []
        for i, ids in enumerate(prompts):
            update = None if events is None else (lambda r, i=i: events.put((i, r.text, r.finish_reason)))
            try:
                requests.append(self.server.engine.submit(Request(ids, on_update=update, **params)))
            except InferenceError as e:
                for r in requests:
                    r.cancel()
                raise RequestError(f"prompt: {e}", "prompt") from None
        return requests

    def _client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as ready with nothing in it (end of file)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or closed under us
            return True

    def _stream(self, requests: list, events: queue.Queue, meta: dict) -> None:
        """Server-sent events: `data: {chunk}` with a choice's new text (its finish_reason in its last), then
        `data: [DONE]`; the connection closes at the end (HTTP/1.0). A client that goes away cancels them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        sent, open_ = [""] * len(requests), len(requests)
        try:
            while open_:
                i, text, reason = events.get()
                if reason in ("error", "cancelled"):
                    error = requests[i].error or "the server is shutting down"
                    self._event({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
                    break
                safe = text if reason else _safe_text(text, requests[i].stop)
                if not safe.startswith(sent[i]) and not reason:
                    continue  # the decoded text changed behind what was sent: wait for more
                delta, sent[i] = safe[len(sent[i]):], safe
                if delta or reason:
                    self._event({**meta, "choices": [{"text": delta, "index": i, "logprobs": None,
                                                      "finish_reason": reason}]})
                open_ -= bool(reason)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        for request in requests:  # those still running after an error or a lost client
            request.cancel()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

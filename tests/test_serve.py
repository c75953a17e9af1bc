"""The completion server over HTTP on localhost (urllib): a completion is generate()'s greedy output, several
prompts per request, concurrent requests from threads get what they get alone, streamed chunks join to the same
text, malformed requests get 4xx JSON errors, a client that leaves cancels its completion; tools/serve.py starts it
from a checkpoint."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from megamoe.data import load_tokenizer
from megamoe.inference import Engine, generate, load_for_inference
from megamoe.inference.server import CompletionServer, _safe_text
from tests.test_generation import ROOT, save_tiny_checkpoint

PROMPTS = ["import os", "def main():\n", "x", "class Foo", "return", "print(1 + 2)"]


@pytest.fixture(scope="module")
def served(tiny_corpus, tmp_path_factory):
    """(base url, model, tokenizer, checkpoint): a server with 2 slots for a tiny MEAF checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root, _, _ = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", tiny_corpus)
    model, _ = load_for_inference(root)
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    engine = Engine(model, slots=2, eod=tok.eod, vocab_size=tok.vocab_size, decode=tok.decode, max_length=64)
    server = CompletionServer(engine, tok, "tiny", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, model, tok, root
    server.close()
    thread.join(10)
    torch.set_num_threads(threads)


def post(url, body, raw=None):
    """(status, parsed JSON or the lines of a stream)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            if response.headers["Content-Type"] == "text/event-stream":
                return response.status, [line.decode() for line in response]
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def alone(model, tok, prompt, max_tokens, **kw):
    ids = generate(model, tok.encode(prompt), max_tokens, eod=tok.eod, vocab_size=tok.vocab_size, **kw)
    return ids, tok.decode([t for t in ids if t != tok.eod])


def test_completion_is_generate_greedy_and_several_prompts(served):
    url, model, tok, _ = served
    status, out = post(url, {"model": "tiny", "prompt": "import os", "max_tokens": 8, "temperature": 0})
    ids, text = alone(model, tok, "import os", 8, temperature=0)
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"] == [{"text": text, "index": 0, "logprobs": None,
                               "finish_reason": "stop" if ids[-1] == tok.eod else "length"}]
    assert out["usage"] == {"prompt_tokens": len(tok.encode("import os")), "completion_tokens": len(ids),
                            "total_tokens": len(tok.encode("import os")) + len(ids)}
    status, out = post(url, {"prompt": PROMPTS[:3], "max_tokens": 6, "temperature": 0})  # 3 prompts, 2 slots
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["text"] for c in out["choices"]] == [alone(model, tok, p, 6, temperature=0)[1] for p in PROMPTS[:3]]
    status, out = post(url, {"prompt": [tok.encode("import os")], "max_tokens": 8, "temperature": 0})  # token ids
    assert status == 200 and out["choices"][0]["text"] == text
    with urllib.request.urlopen(url + "/v1/models", timeout=60) as response:
        status, models = response.status, json.loads(response.read())
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]


def test_concurrent_requests_get_what_they_get_alone(served):
    url, model, tok, _ = served
    bodies = [{"prompt": p, "max_tokens": 5 + i, "temperature": 0} for i, p in enumerate(PROMPTS)]
    bodies += [{"prompt": p, "max_tokens": 6, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 5 + i}
               for i, p in enumerate(PROMPTS[:3])]
    results = [None] * len(bodies)

    def client(i):
        results[i] = post(url, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for body, (status, out) in zip(bodies, results):
        assert status == 200, out
        kw = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed") if k in body}
        assert out["choices"][0]["text"] == alone(model, tok, body["prompt"], body["max_tokens"], **kw)[1], body
    again = post(url, bodies[-1])[1]  # seeded sampling: reproducible
    assert again["choices"] == results[-1][1]["choices"]


def test_streaming_chunks_join_to_the_text_and_stop_strings(served):
    url, model, tok, _ = served
    ids, text = alone(model, tok, "import os", 12, temperature=0)
    assert len(text) > 5, text
    stop = text[3:5]
    for body in ({"prompt": ["import os", "x"], "max_tokens": 12, "temperature": 0},
                 {"prompt": "import os", "max_tokens": 12, "temperature": 0, "stop": [stop, "\x00"]}):
        whole = post(url, body)[1]
        status, lines = post(url, {**body, "stream": True})
        events = [line[len("data: "):].strip() for line in lines if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        for c in whole["choices"]:
            mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == c["index"]]
            assert "".join(m["text"] for m in mine) == c["text"]
            assert [m["finish_reason"] for m in mine][-1] == c["finish_reason"]
            assert all(m["finish_reason"] is None for m in mine[:-1])
    assert whole["choices"][0]["text"] == text[:text.find(stop)] and whole["choices"][0]["finish_reason"] == "stop"
    assert _safe_text("ab\ufffd", ()) == "ab" and _safe_text("abXY", ("XYZ",)) == "ab"
    assert _safe_text("abXYQ", ("XYZ",)) == "abXYQ"


@pytest.mark.parametrize("body, status, param, words", [
    (None, 400, None, "not valid JSON"),
    ([1, 2], 400, None, "JSON object"),
    ({"max_tokens": 4}, 400, "prompt", "missing"),
    ({"prompt": 12}, 400, "prompt", "a string"),
    ({"prompt": []}, 400, "prompt", "a string"),
    ({"prompt": [[1, 10 ** 6]]}, 400, "prompt", "token ids must be in"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "a", "max_tokens": "8"}, 400, "max_tokens", "an integer"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "a number"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_k": 0}, 400, "top_k", ">= 1"),
    ({"prompt": "a", "seed": 1.5}, 400, "seed", "an integer"),
    ({"prompt": "a", "stop": [""]}, 400, "stop", "non-empty string"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "a", "n": 2}, 400, "n", "not supported"),
    ({"prompt": "a", "logit_bias": {}}, 400, "logit_bias", "unknown field"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "use \"tiny\""),
    ({"prompt": "a " * 100, "max_tokens": 4}, 400, "prompt", "at most 63"),
    ({"prompt": "a", "max_tokens": 100}, 400, "max_tokens", "at most 63"),
])
def test_malformed_requests_get_4xx_json_errors(served, body, status, param, words):
    url = served[0]
    got, out = post(url, body, raw=b"{nope" if body is None else None)
    assert got == status and out["error"]["type"] == "invalid_request_error", out
    assert out["error"]["param"] == param and words in out["error"]["message"], out
    if param:
        assert out["error"]["message"].startswith(param)


def test_unknown_paths_and_the_server_still_serves(served):
    url, model, tok, _ = served
    for method, path in (("GET", "/v1/nowhere"), ("POST", "/v1/chat/completions")):
        request = urllib.request.Request(url + path, data=b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == 404 and "no such endpoint" in json.loads(e.value.read())["error"]["message"]
    assert post(url, {"prompt": "x", "max_tokens": 3, "temperature": 0})[1]["choices"][0]["text"] == \
        alone(model, tok, "x", 3, temperature=0)[1]


def test_serve_cli(served, tmp_path):
    url, model, tok, root = served
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", root, "--port", "0",
                             "--threads", "1", "--max-batch-size", "2"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving ckpt on http://127.0.0.1:" in line, line
        cli_url = line.split(" on ")[1].split()[0]
        status, out = post(cli_url, {"prompt": "import os", "max_tokens": 8, "temperature": 0})
        assert status == 200 and out["choices"][0]["text"] == alone(model, tok, "import os", 8, temperature=0)[1]
    finally:
        proc.terminate()
        proc.wait(30)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("serve: error: --load:") and "does not exist" in run.stderr


def test_a_client_that_disconnects_cancels_its_completion(served):
    """A non-streaming client that goes away while its completion decodes: the request is cancelled at once (its
    slot freed for the next request), not decoded to max_tokens for nobody."""
    _, model, tok, _ = served
    engine = Engine(model, slots=1, eod=None, vocab_size=tok.vocab_size, decode=tok.decode)
    step, submitted = engine.step, []
    engine.step = lambda: (time.sleep(0.02), step())  # slow enough to disconnect mid-completion
    submit = engine.submit
    engine.submit = lambda request: submitted.append(request) or submit(request)
    server = CompletionServer(engine, tok, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        body = json.dumps({"prompt": "x", "max_tokens": 500, "temperature": 0}).encode()
        client = socket.create_connection((host, port), timeout=30)
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not (submitted and submitted[0].tokens) and time.monotonic() < deadline:
            time.sleep(0.01)
        client.close()
        assert submitted[0].wait(10), "the request still decodes after its client left"
        assert submitted[0].finish_reason == "cancelled" and 0 < len(submitted[0].tokens) < 500
        status, out = post(server.url, {"prompt": "x", "max_tokens": 3, "temperature": 0})  # the slot is free
        assert status == 200 and out["choices"][0]["text"] == alone(model, tok, "x", 3, temperature=0)[1]
    finally:
        server.close()

"""Tensor-parallel decoding: a checkpoint loaded as two TP shards (load_for_inference(tensor_parallel=2), two
gloo ranks) decodes what one process decodes: the same logits within fp32 rounding, the same greedy tokens for a
ragged batch, the same seeded samples on every rank; tools/generate.py under a TP launch prints the same JSON;
the continuous-batching engine on rank 0 with rank 1 following it (slots reused, the HTTP server over it, idle
keep-alives) completes what one process completes; tools/evaluate.py under a TP launch scores the one-process
perplexity; and what TP decoding refuses."""
import _thread
import contextlib
import io
import json
import os
import threading
import time
import urllib.request

import pytest
import torch

from megamoe.inference import (
    Engine,
    InferenceError,
    Request,
    allocate_cache,
    forward_cached,
    generate,
    load_for_inference,
)
from megamoe.inference import engine as engine_module
from megamoe.inference.engine import follow
from megamoe.inference.server import CompletionServer
from megamoe.testing import run_on_ranks
from tests.test_generation import _tool, one_thread, save_tiny_checkpoint  # noqa: F401 (one_thread: autouse)

PROMPTS = [[5, 17, 300, 42, 8, 9, 11], [7, 3], [900, 12, 4, 4]]  # ragged: 7, 2 and 4 tokens
STEPS = 6


def _decode(model) -> dict:
    """What the test compares between layouts: prefill and step logits, greedy and seeded tokens."""
    cache = allocate_cache(model, 1, len(PROMPTS[0]) + 1)
    prefill_logits = forward_cached(model, torch.tensor(PROMPTS[:1]), cache)
    step_logits = forward_cached(model, torch.tensor([[int(prefill_logits[0, -1].argmax())]]), cache)
    return dict(prefill=prefill_logits, step=step_logits, greedy=generate(model, PROMPTS, STEPS, temperature=0),
                sampled=generate(model, PROMPTS[0], STEPS, temperature=1.0, top_p=0.9, seed=5))


def _requests() -> list:
    """More prompts than the engine's 2 slots (a freed slot takes the next), greedy and seeded."""
    return [Request(p, max_tokens=STEPS, temperature=0) for p in PROMPTS] + [
        Request(PROMPTS[0], max_tokens=STEPS, temperature=1.0, top_k=20, seed=3)]


def _completion(url: str) -> dict:
    body = json.dumps({"prompt": ["import os", "x"], "max_tokens": 5, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _engine_ranks(root: str, tokenizer_path: str):
    """Rank 0: the engine, then the HTTP server over it; rank 1: follow() through both."""
    from megamoe.data import load_tokenizer
    engine_module.KEEPALIVE_SECONDS = 0.05  # idle between the two phases: keep-alives go out
    model, _ = load_for_inference(root, tensor_parallel=2)
    if int(os.environ["RANK"]) == 1:
        with pytest.raises(InferenceError, match="runs on TP rank 0"):
            Engine(model)
        follow(model, 2)
        return None
    with pytest.raises(InferenceError, match="ranks other than 0"):
        follow(model, 2)
    tok = load_tokenizer(tokenizer_path)
    engine = Engine(model, slots=2, eod=tok.eod, vocab_size=tok.vocab_size, decode=tok.decode)
    tokens = [r.tokens for r in engine.run(_requests())]
    server = CompletionServer(engine, tok, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        threading.Event().wait(0.3)  # idle: keep-alives
        texts = [c["text"] for c in _completion(server.url)["choices"]]
    finally:
        server.close()  # the engine stops and releases rank 1
    return tokens, texts


def _serve_cli_ranks(root: str):
    """tools/serve.py under a TP launch: rank 0 serves (a client thread posts, then stops it as Ctrl-C does)."""
    stderr, texts = io.StringIO(), []

    def client():
        deadline = time.monotonic() + 120
        while "serving" not in stderr.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            texts.extend(c["text"] for c in _completion(stderr.getvalue().split(" on ")[1].split()[0])["choices"])
        finally:
            _thread.interrupt_main()

    if int(os.environ["RANK"]) == 0:
        threading.Thread(target=client, daemon=True).start()
    with contextlib.redirect_stderr(stderr):
        rc = _tool("serve").main(["--load", root, "--port", "0", "--max-batch-size", "2",
                                  "--tensor-model-parallel-size", "2"])
    return rc, texts


def _two_ranks(root: str) -> dict:
    torch.manual_seed(int(os.environ["RANK"]))  # unseeded draws differ per rank: the broadcast must align them
    model, cfg = load_for_inference(root, tensor_parallel=2)
    out = _decode(model)
    out["unseeded"] = generate(model, PROMPTS[1], STEPS, temperature=1.0)
    out["vocab_shard"] = model.lm_head.weight.shape[0]
    tool, stdout = _tool("generate"), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        out["rc"] = tool.main(["--load", root, "--prompt", "import os", "--max-new-tokens", "5", "--temperature",
                               "0", "--json", "--tensor-model-parallel-size", "2"])
    out["stdout"] = stdout.getvalue()
    return out


@pytest.mark.parametrize("pattern", ["MEAF"])
def test_tp2_decoding_equals_one_process(tmp_path, tiny_corpus, pattern):
    root, model, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, pattern)
    alone = _decode(load_for_inference(root)[0])
    ranks = run_on_ranks(_two_ranks, 2, args=(root,), timeout=300)
    for r in ranks:
        assert r["vocab_shard"] == model.cfg.vocab_size // 2  # really sharded
        torch.testing.assert_close(r["prefill"], alone["prefill"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["step"], alone["step"], rtol=1e-5, atol=1e-5)
        assert r["greedy"] == alone["greedy"]
        assert r["sampled"] == alone["sampled"]
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]
    # the tool: rank 0 prints the one-process continuation, rank 1 nothing
    from megamoe.data import load_tokenizer
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    expected = generate(model, tok.encode("import os"), 5, temperature=0, eod=tok.eod, vocab_size=tok.vocab_size)
    assert [r["rc"] for r in ranks] == [0, 0]
    assert json.loads(ranks[0]["stdout"].strip().splitlines()[-1])["tokens"] == [expected]
    assert ranks[1]["stdout"] == ""


def test_tp2_engine_and_server_equal_one_process(tmp_path, tiny_corpus):
    from megamoe.data import load_tokenizer
    root, _, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, "MEAF")
    model, _ = load_for_inference(root)
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    engine = Engine(model, slots=2, eod=tok.eod, vocab_size=tok.vocab_size, decode=tok.decode)
    alone = [r.tokens for r in engine.run(_requests())]
    server = CompletionServer(engine, tok, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        texts = [c["text"] for c in _completion(server.url)["choices"]]
    finally:
        server.close()
    tp = run_on_ranks(_engine_ranks, 2, args=(root, tiny_corpus["tokenizer"]), timeout=300)
    assert tp == [(alone, texts), None]
    assert run_on_ranks(_serve_cli_ranks, 2, args=(root,), timeout=300) == [(0, texts), (0, [])]
    assert all(len(t) == STEPS or t[-1] == tok.eod for t in alone)


def _evaluate_ranks(root: str):
    shard = load_for_inference(root, tensor_parallel=2)[0].lm_head.weight.shape[0]  # what the tool will run
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = _tool("evaluate").main(["--load", root, "--split", "valid", "--batch-size", "2", "--max-batches", "3",
                                     "--json", "--tensor-model-parallel-size", "2"])
    return rc, stdout.getvalue(), shard


def test_tp2_perplexity_equals_one_process(tmp_path, tiny_corpus):
    from megamoe.inference import dataset_batches, evaluate_perplexity
    root, _, cfg = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, "MEAF")
    alone = evaluate_perplexity(load_for_inference(root)[0],
                                dataset_batches(cfg.data.data_path, 32, 2, "valid", cfg.data.split), max_batches=3)
    (rc0, out0, shard), (rc1, out1, _) = run_on_ranks(_evaluate_ranks, 2, args=(root,), timeout=300)
    assert (rc0, rc1, out1, shard) == (0, 0, "", cfg.model.vocab_size // 2)  # sharded; rank 0 prints
    result = json.loads(out0.strip().splitlines()[-1])
    assert result["tokens"] == alone["tokens"] == 3 * 2 * 32
    assert result["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_tp_decoding_refuses_a_launch_of_the_wrong_size(tmp_path, tiny_corpus, monkeypatch):
    root, _, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, "MM")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InferenceError, match=r"needs 2 processes, one per shard \(torchrun --nproc-per-node 2\); "
                                             "this launch has 1"):
        load_for_inference(root, tensor_parallel=2)
    with pytest.raises(InferenceError, match="--tensor-model-parallel-size 0 must be >= 1"):
        load_for_inference(root, tensor_parallel=0)

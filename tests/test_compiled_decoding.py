"""Decode steps through torch.compile (megamoe.inference.compiled): every step's logits and states equal the eager
step's, greedy generation, ragged batches and a reused engine slot give the eager tokens, and what it refuses
says so in one line. Each compile takes 5-20 s on a 2-core machine, so one model covers many paths."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.inference import (
    Engine,
    InferenceError,
    Request,
    allocate_cache,
    compile_decoding,
    forward_cached,
    generate,
)
from megamoe.inference.loading import for_cpu_decoding
from megamoe.model import build_model
from tests.test_generation import (  # noqa: F401 (one_thread: a fixture)
    RAGGED,
    ROOT,
    VOCAB,
    _tool,
    one_thread,
    perturbed,
    save_tiny_checkpoint,
    tiny_model,
    tokens,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def two_threads(request):
    """Two threads (the one-token products then take ops.linear's row blocks), restored by one_thread."""
    request.getfixturevalue("one_thread")
    torch.set_num_threads(2)


def wide_model():
    """d_model 256: the products take ops.linear's row-blocked (one row) and oneDNN (rows) paths; Mamba and MoE
    blocks with top-2 routing, a shared expert, the experts laid out as load_for_inference lays them on CPU."""
    cfg = ModelConfig(d_model=256, d_state=8, vocab_size=VOCAB, num_experts=4, pattern="MEME", capacity_factor=0,
                      top_k=2, shared_expert_intermediate_size=256)
    return for_cpu_decoding(perturbed(build_model(cfg, seed=5), 5))


def assert_steps_equal(eager, compiled, batch, steps=5):
    ids = tokens(batch, 4 + steps, seed=batch)
    caches = [allocate_cache(m, batch) for m in (eager, compiled)]
    for model, cache in zip((eager, compiled), caches):
        forward_cached(model, ids[:, :4], cache)  # the prompt: eager in both
    for t in range(4, 4 + steps):
        expected, got = (forward_cached(m, ids[:, t:t + 1], c) for m, c in zip((eager, compiled), caches))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name, state in caches[0].states.items():
            for a, b in zip(state, caches[1].states[name]):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_steps_equal_eager_steps(batch):
    """One sequence (one-token products and experts inside the graph) and three (the opaque expert op, oneDNN)."""
    eager = wide_model()
    compiled = compile_decoding(copy.deepcopy(eager))
    assert_steps_equal(eager, compiled, batch)
    prompts = RAGGED[:batch]
    assert generate(compiled, prompts, 6, temperature=0) == generate(eager, prompts, 6, temperature=0)


def test_compiled_engine_and_other_blocks():
    """Parallel MoE-Mamba with MoE projections inside Mamba, compiled for the engine's two slots at once: five
    requests of ragged prompts through reused slots give the eager tokens; a new batch size compiles anew."""
    eager = tiny_model(pattern="MEME", parallel_moe=True, mamba_moe_projections=["conv", "output"],
                       capacity_factor=0)
    compiled = compile_decoding(copy.deepcopy(eager), batch_sizes=[2])
    engine = Engine(compiled, slots=2)
    requests = engine.run([Request(p, 5, 0.0) for p in RAGGED + [[3, 1, 4, 1, 5, 9]]])
    assert [r.tokens for r in requests] == [generate(eager, r.prompt, 5, temperature=0) for r in requests]
    assert_steps_equal(eager, compiled, 1, steps=3)


def test_what_compiling_refuses(monkeypatch):
    with pytest.raises(InferenceError, match="without attention blocks"):
        compile_decoding(tiny_model(pattern="MAMF"))
    model = compile_decoding(tiny_model(pattern="MM", mamba_d_inner=72))  # a shape no test compiles
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}):
        cache = allocate_cache(model, 1)
        forward_cached(model, tokens(1, 3), cache)
        before = [t.clone() for state in cache.states.values() for t in state]
        with pytest.raises(InferenceError, match="could not compile the decode step .*run without --compile"):
            forward_cached(model, tokens(1, 1), cache)
        assert all(torch.equal(a, b) for a, b in zip(before, [t for s in cache.states.values() for t in s]))


def test_generate_cli_compile(tmp_path, tiny_corpus, capsys):
    from megamoe.data import load_tokenizer
    tool = _tool("generate")
    root, model, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, pattern="MEME")
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    assert tool.main(["--load", root, "--prompt", "import os", "--max-new-tokens", "6", "--temperature", "0",
                      "--compile", "--json", "--threads", "2", "--num-samples", "2"]) == 0
    captured = capsys.readouterr()
    expected = generate(model, [tok.encode("import os")] * 2, 6, temperature=0, eod=tok.eod,
                        vocab_size=tok.vocab_size)
    assert json.loads(captured.out.strip().splitlines()[-1])["tokens"] == expected
    assert "decode steps compiled in" in captured.err
    attention, _, _ = save_tiny_checkpoint(tmp_path / "attention", tiny_corpus, pattern="MEAF")
    assert tool.main(["--load", attention, "--compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate: error: --compile decodes models without attention") and "\n" not in err


def test_serve_cli_compile(tmp_path, tiny_corpus):
    """tools/serve.py --compile: compiled for its slots before it listens, then serves the eager tokens."""
    from megamoe.data import load_tokenizer
    from tests.test_serve import alone, post
    root, model, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, pattern="MEME")
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", root, "--port", "0",
                             "--threads", "2", "--max-batch-size", "2", "--compile"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline()]
        while "serving" not in lines[-1] and lines[-1] and len(lines) < 200:  # Inductor may warn in between
            lines.append(proc.stderr.readline())
        assert lines[0].startswith("compiling the decode steps of 2 slots") and "serving" in lines[-1], lines
        url = lines[-1].split(" on ")[1].split()[0]
        status, out = post(url, {"prompt": ["import os", "x"], "max_tokens": 8, "temperature": 0})
        assert status == 200 and [c["text"] for c in out["choices"]] == [
            alone(model, tok, p, 8, temperature=0)[1] for p in ("import os", "x")]
    finally:
        proc.terminate()
        proc.wait(30)

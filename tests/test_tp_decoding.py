"""Tensor-parallel decoding: a checkpoint loaded as two TP shards (load_for_inference(tensor_parallel=2), two
gloo ranks) decodes what one process decodes: the same logits within fp32 rounding, the same greedy tokens for a
ragged batch, the same seeded samples on every rank; tools/generate.py under a TP launch prints the same JSON;
and what TP decoding refuses."""
import contextlib
import io
import json
import os

import pytest
import torch

from megamoe.inference import (
    Engine,
    InferenceError,
    allocate_cache,
    forward_cached,
    generate,
    load_for_inference,
)
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


def _two_ranks(root: str) -> dict:
    torch.manual_seed(int(os.environ["RANK"]))  # unseeded draws differ per rank: the broadcast must align them
    model, cfg = load_for_inference(root, tensor_parallel=2)
    out = _decode(model)
    out["unseeded"] = generate(model, PROMPTS[1], STEPS, temperature=1.0)
    out["vocab_shard"] = model.lm_head.weight.shape[0]
    try:
        Engine(model)
    except InferenceError as e:
        out["engine"] = str(e)
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
        assert "tensor-parallel model decodes with generate" in r["engine"]
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]
    # the tool: rank 0 prints the one-process continuation, rank 1 nothing
    from megamoe.data import load_tokenizer
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    expected = generate(model, tok.encode("import os"), 5, temperature=0, eod=tok.eod, vocab_size=tok.vocab_size)
    assert [r["rc"] for r in ranks] == [0, 0]
    assert json.loads(ranks[0]["stdout"].strip().splitlines()[-1])["tokens"] == [expected]
    assert ranks[1]["stdout"] == ""


def test_tp_decoding_refuses_a_launch_of_the_wrong_size(tmp_path, tiny_corpus, monkeypatch):
    root, _, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus, "MM")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InferenceError, match=r"needs 2 processes, one per shard \(torchrun --nproc-per-node 2\); "
                                             "this launch has 1"):
        load_for_inference(root, tensor_parallel=2)

"""Perplexity: the token-weighted mean loss by hand, windows that score every token once, dataset parts and raw
text files as sources, and tools/evaluate.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamoe.data import DataError, load_tokenizer
from megamoe.inference import (
    dataset_batches,
    dataset_chunks,
    evaluate_perplexity,
    load_for_inference,
    text_batches,
    token_batches,
)
from tests.test_generation import ROOT, _tool, one_thread, save_tiny_checkpoint, tiny_model  # noqa: F401


def test_perplexity_is_exp_of_the_token_weighted_mean_loss():
    model = tiny_model(pattern="MEAF")
    gen = torch.Generator().manual_seed(4)
    batches = []
    for batch, length in ((3, 7), (1, 5)):  # unequal sizes: a mean over batches would weigh them wrongly
        ids = torch.randint(0, 64, (batch, length + 1), generator=gen)
        mask = (torch.rand(batch, length, generator=gen) > 0.3).float()
        batches.append(dict(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=mask))
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            logp = F.log_softmax(model(b["tokens"]).logits.double(), dim=-1)
            nll = -logp.gather(-1, b["labels"][..., None])[..., 0]
            total += float((nll * b["loss_mask"]).sum())
            count += float(b["loss_mask"].sum())
    result = evaluate_perplexity(model, batches)
    assert result["tokens"] == count and result["batches"] == 2
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(np.exp(total / count), rel=1e-6)
    assert evaluate_perplexity(model, batches, max_batches=1)["tokens"] == float(batches[0]["loss_mask"].sum())
    unmasked = [{k: v for k, v in b.items() if k != "loss_mask"} for b in batches]
    assert evaluate_perplexity(model, unmasked)["tokens"] == 3 * 7 + 5


def test_windows_score_every_token_once():
    stream = np.arange(100, 123)  # 23 tokens
    batches = list(token_batches([stream[:4], stream[4:15], stream[15:]], seq_length=5, batch_size=2))
    assert [tuple(b["tokens"].shape) for b in batches] == [(2, 5), (2, 5), (1, 2)]  # the tail alone, unpadded
    assert batches[0]["tokens"][1].tolist() == list(range(105, 110))
    labels = torch.cat([b["labels"].flatten() for b in batches]).tolist()
    assert labels == stream[1:].tolist()
    assert all(torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:]) for b in batches)
    with pytest.raises(DataError, match="token id 122, beyond the model's vocabulary of 120"):
        list(token_batches([stream], 5, 2, vocab_size=120))


def test_dataset_parts_and_text_files(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus["prefix"], load_tokenizer(tiny_corpus["tokenizer"])
    every = np.fromfile(prefix + ".bin", dtype=np.uint16)
    parts = [np.concatenate(list(dataset_chunks([prefix], part, "6,2,2", tok))) for part in ("train", "valid", "test")]
    assert all(len(p) for p in parts)
    assert np.array_equal(np.concatenate(parts), every)
    assert np.array_equal(np.concatenate(list(dataset_chunks([prefix]))), every)
    batches = list(dataset_batches([prefix], 64, 4, "valid", "6,2,2", vocab_size=1024))
    assert torch.cat([b["labels"].flatten() for b in batches]).tolist() == parts[1][1:].tolist()
    with pytest.raises(DataError, match="the test part of --split 949,50,1 holds none of its 10 documents"):
        dataset_chunks([prefix], "test", "949,50,1")
    with pytest.raises(DataError, match="blend weights mean nothing"):
        dataset_chunks(["0.5", prefix, "0.5", prefix])
    # raw files: each text (a whole .txt, a JSONL record) then EOD, as preprocess_data.py --append-eod does
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "import os"}) + "\n" + json.dumps({"text": "pass"}) + "\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    expected = []
    for text in ("def f(x):\n    return x + 1\n", "import os", "pass"):
        expected += tok.encode(text) + [tok.eod]
    labels = torch.cat([b["labels"].flatten() for b in text_batches(files, tok, 8, 2)]).tolist()
    assert labels == expected[1:]
    with pytest.raises(DataError, match="no such file"):
        text_batches([str(tmp_path / "missing.txt")], tok, 8, 2)


def test_evaluate_cli(tmp_path, tiny_corpus, capsys):
    root, _, cfg = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus)
    model, _ = load_for_inference(root)
    expected = evaluate_perplexity(model, dataset_batches(cfg.data.data_path, 32, 2, "valid", cfg.data.split),
                                   max_batches=3)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", root, "--split",
                          "valid", "--batch-size", "2", "--max-batches", "3", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["tokens"] == expected["tokens"] == 3 * 2 * 32 and out["seq_length"] == 32
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert out["ppl"] == pytest.approx(np.exp(out["loss"]), rel=1e-9)
    # text mode and user errors, in process
    tool = _tool("evaluate")
    (tmp_path / "notes.txt").write_text("import sys\nprint(sys.argv)\n" * 5)
    assert tool.main(["--load", root, "--text-file", str(tmp_path / "notes.txt"), "--seq-length", "16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("loss ") and " ppl " in line
    for argv, message in ((["--load", root], "say what to score"),
                          (["--load", root, "--text-file", str(tmp_path / "gone.txt")], "no such file"),
                          (["--load", root, "--data-path", str(tmp_path / "nothing")], "nothing.idx does not exist"),
                          (["--load", str(tmp_path / "nowhere"), "--split", "valid"], "does not exist")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("evaluate: error: ") and message in err and len(err.splitlines()) == 1

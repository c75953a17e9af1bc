"""Megatron's --reset-position-ids, --reset-attention-mask and --eod-mask-loss from the data to the loss: the
batches carry the document fields of their EOD tokens, --eod-mask-loss leaves EOD inputs out of the loss and of
its token count, and the flags train end to end from the command line."""
import os
import subprocess
import sys

import pytest
import torch

from megamoe.config import config_from_dict
from megamoe.data import build_data_iterators, load_tokenizer
from megamoe.data.packing import document_index, document_positions
from megamoe.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(corpus, **data):
    return config_from_dict({
        "model": {"pattern": "MEAF", "d_model": 32, "d_state": 8, "num_experts": 4, "num_heads": 4,
                  "vocab_size": 1024, "capacity_factor": 0},
        "data": {"data_path": [corpus["prefix"]], "tokenizer_model": corpus["tokenizer"], "seq_length": 128,
                 "split": "80,20,0", **data},
        "training": {"train_iters": 2, "micro_batch_size": 4, "global_batch_size": 4, "eval_iters": 1,
                     "eval_interval": 1}})


def test_batches_carry_the_document_fields_and_the_loss_leaves_eod_out(tiny_corpus):
    eod = load_tokenizer(tiny_corpus["tokenizer"]).eod
    plain_batches = build_data_iterators(_cfg(tiny_corpus), 0, 1)[0]
    cfg = _cfg(tiny_corpus, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    train, valid = build_data_iterators(cfg, 0, 1)
    for _ in range(8):  # the first batch whose rows are packed from several documents
        plain, batch = next(plain_batches), next(train)
        if (batch["tokens"] == eod).any():
            break
    assert set(plain) == {"tokens", "labels", "loss_mask"}  # off by default, as in Megatron
    tokens = batch["tokens"]
    assert torch.equal(tokens, plain["tokens"]) and (tokens == eod).any()  # rows packed from several documents
    assert batch["seq_idx"].dtype == torch.int32 and torch.equal(batch["seq_idx"], document_index(tokens, eod))
    assert torch.equal(batch["position_ids"], document_positions(batch["seq_idx"]))
    assert torch.equal(batch["loss_mask"], (tokens != eod).float())
    assert "seq_idx" in valid()[0]  # validation sees the same fields

    model = build_model(cfg.model, seed=0)
    out = model(**batch)
    per_token = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(),
                                                  reduction="none").view_as(tokens)
    keep = tokens != eod
    torch.testing.assert_close(out.lm_loss, per_token[keep].mean())  # EOD targets out of loss and count


@pytest.mark.slow
def test_the_flags_train_end_to_end_from_the_command_line(tiny_corpus, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "megamoe.cli.train", "--model.pattern", "MEAF", "--model.d_model", "32", "--model.num_heads", "4",
           "--model.num_experts", "4", "--data-path", tiny_corpus["prefix"], "--tokenizer-model",
           tiny_corpus["tokenizer"], "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--train-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--split", "80,20,0",
           "--tensor-model-parallel-size", "2", "--sequence-parallel", "--reset-position-ids",
           "--reset-attention-mask", "--eod-mask-loss", "--logging.log_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reset_attention_mask: true" in (tmp_path / "config.yaml").read_text()
    assert "valid" in out.stdout

"""A Hugging Face tokenizer (a byte-level BPE trained here with the `tokenizers` library, in a tokenizer.json folder)
through the whole path: --tokenizer-type HuggingFaceTokenizer in the config, training (its vocabulary and EOD), the
fingerprint check between the data and the run, tools/generate.py and tools/evaluate.py."""
import json
import os

import pytest

from megamoe.config import build_config, config_from_dict
from megamoe.data import HuggingFaceTokenizer, load_tokenizer
from megamoe.errors import ConfigError, DataError
from megamoe.parallel import destroy_distributed
from megamoe.training import train
from tests.test_generation import _tool, one_thread  # noqa: F401


def _config(hf_corpus, tmp_path, **data):
    return config_from_dict({
        "model": {"pattern": "MEME", "d_model": 32, "d_state": 8, "num_experts": 4},
        "data": {"data_path": [hf_corpus["prefix"]], "tokenizer_model": hf_corpus["tokenizer"],
                 "tokenizer_type": "HuggingFaceTokenizer", "seq_length": 32, "split": "80,20,0", **data},
        "training": {"train_iters": 3, "micro_batch_size": 2, "global_batch_size": 2, "eval_interval": 3,
                     "eval_iters": 1},
        "checkpoint": {"save": str(tmp_path / "ckpt")},
        "logging": {"log_dir": str(tmp_path / "run"), "log_interval": 1, "tensorboard": False}})


def test_megatron_flag_sets_the_tokenizer_type(hf_corpus):
    cfg = build_config(None, ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_corpus["tokenizer"],
                              "--data-path", hf_corpus["prefix"]])
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer"
    cfg.data.validate()
    cfg.data.tokenizer_type = "GPT2BPETokenizer"
    with pytest.raises(ConfigError, match="--tokenizer-type GPT2BPETokenizer: use one of"):
        cfg.data.validate()
    cfg.data.tokenizer_type = "GPTSentencePieceTokenizer"
    with pytest.raises(ConfigError, match="is a folder.*HuggingFaceTokenizer"):
        cfg.data.validate()


def test_train_generate_evaluate_with_a_hugging_face_tokenizer(hf_corpus, tiny_corpus, tmp_path, quiet_env,
                                                               capsys):
    tok = load_tokenizer(hf_corpus["tokenizer"])
    assert isinstance(tok, HuggingFaceTokenizer) and tok.vocab_size == 1024
    try:
        summary = train(_config(hf_corpus, tmp_path))
    finally:
        destroy_distributed()
    assert summary["step"] == 3 and summary["final"]["valid_loss"] > 0
    root = str(tmp_path / "ckpt")
    generate = _tool("generate")
    assert generate.main(["--load", root, "--prompt", "def main(", "--max-new-tokens", "6", "--seed", "1",
                          "--temperature", "0", "--json", "--no-stop-at-eod"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["tokens"][0]) == 6 and max(out["tokens"][0]) < tok.vocab_size
    assert out["samples"][0] == tok.decode(out["tokens"][0])
    evaluate = _tool("evaluate")
    assert evaluate.main(["--load", root, "--split", "valid", "--max-batches", "1", "--batch-size", "1",
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 32 and result["loss"] > 0
    # the checkpoint's tokenizer is Hugging Face's; a sentencepiece model given instead fails the data's check
    assert evaluate.main(["--load", root, "--split", "valid", "--tokenizer-model", tiny_corpus["tokenizer"]]) == 2
    err = capsys.readouterr().err
    assert "preprocessed with tokenizer" in err and "is a different one" in err and len(err.strip().splitlines()) == 1
    # the Hugging Face export ships it: AutoTokenizer reads the same ids and text back, eos = megamoe's EOD
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    assert _tool("convert_checkpoint").main([root, "--output", out, "--format", "hf"]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ != "MegaMoETokenizer" and "tokenizer.model" not in os.listdir(out)
    assert hf.eos_token_id == tok.eod and len(hf) == tok.vocab_size
    for text in ("def f(x):\n\treturn x  +  1\n", "  leading spaces, ünïcode — and 12345 digits\n\n", ""):
        ids = hf(text).input_ids
        assert ids == tok.encode(text) and hf.decode(ids) == tok.decode(ids) == text
    config = json.load(open(os.path.join(out, "generation_config.json")))
    assert config["eos_token_id"] == tok.eod


def test_a_run_with_another_tokenizer_than_the_data_stops_before_training(hf_corpus, tiny_corpus, tmp_path,
                                                                          quiet_env):
    cfg = _config(hf_corpus, tmp_path, tokenizer_model=tiny_corpus["tokenizer"], tokenizer_type=None)
    try:
        with pytest.raises(DataError, match="preprocessed with tokenizer .*hf_tokenizer.*is a different one"):
            train(cfg)
    finally:
        destroy_distributed()

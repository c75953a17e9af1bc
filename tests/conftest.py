"""Shared test settings: small thread pools (the machines have 2 cores), the `slow` marker, and a tiny
preprocessed corpus that training tests share."""
import os

import pytest
import torch

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long multi-process runs; still part of CI")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """300 KB of the default corpus, a 1024-piece tokenizer, and its .bin/.idx: {prefix, tokenizer}."""
    from megamoe.data import preprocess, train_tokenizer, write_default_corpus
    folder = tmp_path_factory.mktemp("tiny_corpus")
    corpus = str(folder / "corpus.jsonl")
    write_default_corpus(corpus, max_bytes=300_000)
    tokenizer = train_tokenizer([corpus], str(folder / "tok"), 1024)
    out = preprocess([corpus], tokenizer, str(folder / "corpus"), append_eod=True, progress=False)
    return dict(prefix=out["outputs"]["text"], tokenizer=tokenizer, folder=str(folder))


@pytest.fixture
def quiet_env(monkeypatch):
    """No launcher variables from the environment: train() runs as a single process."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return os.environ


def train_hf_tokenizer(corpus: str, folder: str, vocab_size: int = 1024, config: bool = True) -> str:
    """A byte-level BPE (GPT-2's kind) trained with the `tokenizers` library on a JSONL corpus, saved as a Hugging
    Face tokenizer folder: tokenizer.json (+ tokenizer_config.json naming <|endoftext|> as eos)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((json.loads(line)["text"] for line in open(corpus, encoding="utf-8")), trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if config:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "GPT2TokenizerFast"}, f)
    return folder


@pytest.fixture(scope="session")
def hf_corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus preprocessed with a locally trained byte-level BPE in a Hugging Face tokenizer folder:
    {prefix, tokenizer (the folder), corpus}."""
    from megamoe.data import preprocess
    folder = tmp_path_factory.mktemp("hf_corpus")
    corpus = os.path.join(tiny_corpus["folder"], "corpus.jsonl")
    tokenizer = train_hf_tokenizer(corpus, str(folder / "hf_tokenizer"))
    out = preprocess([corpus], tokenizer, str(folder / "corpus"), append_eod=True, progress=False)
    return dict(prefix=out["outputs"]["text"], tokenizer=tokenizer, corpus=corpus)

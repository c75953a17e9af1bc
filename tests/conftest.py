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

"""The embedded default corpus: the standard library as JSONL, deterministic, capped, library first."""
import json
import os

import pytest

from megamoe.data import DataError, iter_default_documents, write_default_corpus


def test_default_corpus_is_deterministic_capped_jsonl(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = write_default_corpus(str(a), max_bytes=200_000)
    write_default_corpus(str(b), max_bytes=200_000)
    assert a.read_bytes() == b.read_bytes()
    assert stats["truncated"] and 0 < stats["bytes"] == a.stat().st_size <= 200_000
    records = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(records) == stats["documents"] > 0
    assert all(set(r) == {"text", "source"} and r["text"].strip() for r in records)
    assert records[0]["source"].endswith(".py") and not records[0]["source"].startswith("test/")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_library_then_docs_then_tests():
    sources = [src for src, _ in iter_default_documents()]
    docs = [i for i, s in enumerate(sources) if "#" in s]
    tests = [i for i, s in enumerate(sources) if s.split(os.sep)[0] == "test"]
    library = [i for i, s in enumerate(sources) if i not in set(docs) | set(tests)]
    assert len(library) > 500 and docs and tests
    assert max(library) < min(docs) and max(docs) < min(tests)


def test_cap_below_first_document_is_an_error(tmp_path):
    out = tmp_path / "c.jsonl"
    with pytest.raises(DataError, match="max_bytes"):
        write_default_corpus(str(out), max_bytes=10)
    assert os.listdir(tmp_path) == []

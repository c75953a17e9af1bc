"""The embedded default corpus: the standard library as JSONL, deterministic, capped, library first, mixed."""
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
    assert all(r["source"].endswith(".py") and not r["source"].startswith("test/") for r in records)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_library_then_docs_then_tests():
    sources = [src for src, _ in iter_default_documents()]
    docs = [i for i, s in enumerate(sources) if "#" in s]
    tests = [i for i, s in enumerate(sources) if s.split(os.sep)[0] == "test"]
    library = [i for i, s in enumerate(sources) if i not in set(docs) | set(tests)]
    assert len(library) > 500 and docs and tests
    assert max(library) < min(docs) and max(docs) < min(tests)


def _fake_stdlib(root, modules=40, tests=40):
    for i in range(modules):
        (root / "pkg").mkdir(exist_ok=True)
        (root / "pkg" / f"mod{i:02d}.py").write_text(f"x = {i}\n" * 20)
    (root / "test").mkdir()
    for i in range(tests):
        (root / "test" / f"test_{i:02d}.py").write_text(f"assert {i}\n" * 20)


def test_chosen_documents_are_written_in_a_mixed_order(tmp_path):
    """The cap chooses documents in order (library first); the file mixes them, so that Megatron's split,
    which takes documents in file order, draws validation from the same mix as training (not tests alone)."""
    root = tmp_path / "stdlib"
    root.mkdir()
    _fake_stdlib(root)
    full, capped = tmp_path / "full.jsonl", tmp_path / "capped.jsonl"
    write_default_corpus(str(full), root=str(root))
    stats = write_default_corpus(str(capped), max_bytes=60 * 1024 // 20, root=str(root))
    order = [src.replace(os.sep, "/") for src, _ in iter_default_documents(str(root))]
    sources = [json.loads(line)["source"] for line in full.read_text().splitlines()]
    assert sorted(sources) == sorted(order) and sources != order  # every document, not in iteration order
    tail = sources[-len(sources) // 10:]  # a 90,10 split's validation part
    assert any(s.startswith("test/") for s in tail) and any(s.startswith("pkg/") for s in tail)
    chosen = [json.loads(line)["source"] for line in capped.read_text().splitlines()]
    assert stats["truncated"] and sorted(chosen) == sorted(order[:len(chosen)])  # the cap keeps the first ones
    again = tmp_path / "again.jsonl"
    write_default_corpus(str(again), root=str(root))
    assert again.read_bytes() == full.read_bytes()


def test_cap_below_first_document_is_an_error(tmp_path):
    out = tmp_path / "c.jsonl"
    with pytest.raises(DataError, match="max_bytes"):
        write_default_corpus(str(out), max_bytes=10)
    assert os.listdir(tmp_path) == []

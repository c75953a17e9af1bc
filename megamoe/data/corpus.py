"""The embedded default corpus: the Python standard library's own sources and docs.

Every machine with Python has it, so the quickstart needs no download. Written as JSONL, one
document per line: {"text": ..., "source": path relative to the stdlib}. Documents are chosen in
a fixed order: the library's modules (sorted by path), then the documentation topics of `pydoc_data`
(the text of the language reference and library docs that `help()` shows), then the test suite, so a
`max_bytes` cap keeps the library and its docs first. The chosen documents are then written in a
deterministic mixed order (a seeded shuffle): Megatron's train/valid/test split takes documents in file
order, and without the mix the validation split would be the test suite alone.
"""
from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import time
from typing import Iterator, Optional

from megamoe.errors import DataError

# Not the standard library itself: installed packages, compiled extensions, build files.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
DOCS_FILE = os.path.join("pydoc_data", "topics.py")
MIX_SEED = 1234  # the order the chosen documents are written in


def stdlib_path() -> str:
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> tuple:
    library, tests = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)
                (tests if rel.split(os.sep)[0] in ("test", "tests") else library).append(rel)
    return library, tests


def _doc_topics(root: str) -> Iterator[tuple]:
    """(source, text) of each pydoc topic: `topics = {...}` in pydoc_data/topics.py, read without importing."""
    path = os.path.join(root, DOCS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield f"{DOCS_FILE}#{name}", topics[name]


def iter_default_documents(root: Optional[str] = None) -> Iterator[tuple]:
    """(source, text) of every default-corpus document in order; files that are not UTF-8 are skipped."""
    root = root or stdlib_path()
    library, tests = _source_files(root)
    for rel in library:
        if rel != DOCS_FILE:  # its text comes as separate documentation topics below
            yield rel, os.path.join(root, rel)
    yield from ((src, text) for src, text in _doc_topics(root))
    for rel in tests:
        yield rel, os.path.join(root, rel)


def write_default_corpus(path: str, max_bytes: Optional[int] = None, root: Optional[str] = None) -> dict:
    """Write the default corpus to `path` as JSONL: the documents in order until the next would exceed
    `max_bytes`, then written in MIX_SEED's mixed order (the same documents and order on every run).

    Returns stats: documents, bytes, skipped (files not valid UTF-8 or empty), truncated, stdlib, seconds.
    The file appears under its name only when complete."""
    start = time.perf_counter()
    root = root or stdlib_path()
    if not os.path.isdir(root):
        raise DataError(f"the standard library folder {root} (sysconfig 'stdlib') does not exist; "
                        "bring your own JSONL corpus instead")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    stats = dict(documents=0, bytes=0, skipped=0, truncated=False, stdlib=root, path=path)
    lines = []  # the chosen documents, at most max_bytes (the whole library without a cap: ~100 MB)
    try:
        with open(tmp, "wb") as out:
            for source, item in iter_default_documents(root):
                if source.endswith(".py"):
                    try:
                        with open(item, encoding="utf-8") as f:
                            text = f.read()
                    except (UnicodeDecodeError, OSError):
                        stats["skipped"] += 1  # a few test files are deliberately in other encodings
                        continue
                else:
                    text = item
                if not text.strip():
                    stats["skipped"] += 1
                    continue
                line = (json.dumps({"text": text, "source": source.replace(os.sep, "/")}, ensure_ascii=False)
                        + "\n").encode("utf-8")
                if max_bytes is not None and stats["bytes"] + len(line) > max_bytes:
                    stats["truncated"] = True
                    break
                lines.append(line)
                stats["documents"] += 1
                stats["bytes"] += len(line)
            random.Random(MIX_SEED).shuffle(lines)
            out.writelines(lines)
        if stats["documents"] == 0:
            raise DataError(f"{path}: no documents written (max_bytes={max_bytes} is smaller than the "
                            "first document); raise max_bytes")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    stats["seconds"] = time.perf_counter() - start
    return stats

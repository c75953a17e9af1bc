"""Reading corpora: JSONL files, text files, folders and globs, optionally gzipped.

A *record* is one JSONL line, or a whole text file (`text_mode="file"`), or one line of a text file
(`text_mode="line"`). `parse_record` turns a record into one text per JSON key or names why it is
bad. `split_ranges` cuts the input into contiguous byte ranges (at line boundaries) so partitions
can be read in parallel and still concatenate to exactly the single-pass order.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from megamoe.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_MODES = ("file", "line")
# Why a record is skipped (or, with strict, stops the run). Blank lines are not records at all.
BAD_REASONS = ("malformed_json", "missing_key", "not_a_string", "not_utf8", "empty")


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of a file, as whole lines: a line belongs to the range it starts in."""

    path: str
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def is_jsonl(path: str) -> bool:
    base = path[:-3] if is_gzip(path) else path
    return base.lower().endswith(JSONL_SUFFIXES)


def _walk(folder: str) -> list:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return found


def resolve_inputs(inputs: Sequence[str] | str) -> list:
    """Expand files, folders (recursively, sorted, hidden entries skipped) and globs to a file list."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for spec in map(str, inputs):
        if os.path.isdir(spec):
            files += _walk(spec)
        elif os.path.isfile(spec):
            files.append(spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"--input {spec}: the glob matches no files")
            for m in matches:
                files += _walk(m) if os.path.isdir(m) else [m]
        else:
            raise DataError(f"--input {spec}: no such file, folder or glob; give JSONL or text files, "
                            "a folder of them, or a quoted glob such as 'data/*.jsonl.gz'")
    files = list(dict.fromkeys(files))  # keep the first occurrence of repeated paths
    if not files:
        raise DataError(f"--input {' '.join(map(str, inputs))}: no files found (the folders are empty)")
    return files


def open_binary(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _splittable(path: str, text_mode: str) -> bool:
    """Line-based files can be cut at line boundaries; gzip streams and whole-file documents cannot."""
    return not is_gzip(path) and (is_jsonl(path) or text_mode == "line")


def split_ranges(files: Sequence[str], parts: int, text_mode: str = "file") -> list:
    """Cut the concatenated input into up to `parts` contiguous shards of about equal size.

    Returns a list of shards, each a list of Ranges; empty shards are dropped. Reading the shards one
    after another yields exactly the records of reading the files in order."""
    sizes = [os.path.getsize(p) for p in files]
    total = sum(sizes)
    cuts = [total * k // parts for k in range(1, parts)]
    shards: list = [[] for _ in range(parts)]
    shard, offset = 0, 0
    for path, size in zip(files, sizes):
        if _splittable(path, text_mode):
            start = 0
            while shard < parts - 1 and cuts[shard] < offset + size:
                cut = cuts[shard] - offset
                if cut > start:
                    shards[shard].append(Range(path, start, cut))
                    start = cut
                shard += 1
            if start < size:
                shards[shard].append(Range(path, start))
        else:  # a whole-file record goes to the shard its first byte falls in
            while shard < parts - 1 and cuts[shard] <= offset:
                shard += 1
            shards[shard].append(Range(path))
        offset += size
    return [s for s in shards if s]


def iter_raw(rng: Range, text_mode: str = "file") -> Iterator[tuple]:
    """(line number within the range or None for a whole file, raw bytes) for each record of a range."""
    if not is_jsonl(rng.path) and text_mode == "file":
        with open_binary(rng.path) as f:
            yield None, f.read()
        return
    with open_binary(rng.path) as f:
        if rng.start:
            f.seek(rng.start - 1)
            f.readline()  # the line in progress at `start` belongs to the previous range
        pos = f.tell()
        for lineno, line in enumerate(f, 1):
            if rng.end is not None and pos >= rng.end:
                break
            pos += len(line)
            yield lineno, line


def line_base(rng: Range) -> int:
    """Lines before the range's start, so a line number within it can be reported for the file."""
    if not rng.start:
        return 0
    count, left = 0, rng.start
    with open_binary(rng.path) as f:
        f.seek(0)
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    # the line in progress at `start` was skipped by iter_raw, so the first record is one line later
    with open_binary(rng.path) as f:
        f.seek(rng.start - 1)
        at_line_start = f.read(1) == b"\n"
    return count if at_line_start else count + 1


def parse_record(data: bytes, is_json: bool, keys: Sequence[str], whole_file: bool = False):
    """(texts, None, "") for a good record, (None, reason, detail) for a bad one, (None, None, "")
    for a blank line, which is not a record."""
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "not_utf8", f"invalid UTF-8 byte 0x{data[e.start]:02x} at byte {e.start}"
    if not is_json:
        if whole_file:
            return ([s], None, "") if s.strip() else (None, "empty", "the file holds no text")
        s = s.rstrip("\r\n")
        return ([s], None, "") if s.strip() else (None, None, "")
    if not s.strip():
        return None, None, ""
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return None, "malformed_json", str(e)
    if not isinstance(obj, dict):
        return None, "malformed_json", (f"a JSONL line must be an object like {{\"text\": ...}}, "
                                         f"not a {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            return None, "missing_key", f"no key {key!r} (keys: {', '.join(map(repr, list(obj)[:5]))})"
        value = obj[key]
        if not isinstance(value, str):
            return None, "not_a_string", f"{key!r} is a {type(value).__name__}, not a string"
        if not value.strip():
            return None, "empty", f"{key!r} is empty"
        texts.append(value)
    return texts, None, ""


def check_keys_for_text(files: Sequence[str], keys: Sequence[str], text_mode: str) -> None:
    if text_mode not in TEXT_MODES:
        raise DataError(f"text_mode={text_mode!r}: use 'file' (one document per text file) or 'line'")
    text_files = [f for f in files if not is_jsonl(f)]
    if text_files and list(keys) != ["text"]:
        raise DataError(f"{text_files[0]} is a text file, which has only the 'text' key, but --json-keys is "
                        f"{' '.join(keys)}; give JSONL files or --json-keys text")


def iter_texts(inputs: Sequence[str] | str, keys: Sequence[str] = ("text",), text_mode: str = "file",
               counts: Optional[dict] = None) -> Iterator[str]:
    """Every good text of the inputs (all keys of a record in order); bad records are counted in
    `counts` by reason and skipped."""
    files = resolve_inputs(inputs)
    check_keys_for_text(files, keys, text_mode)
    for path in files:
        is_json = is_jsonl(path)
        for lineno, data in iter_raw(Range(path), text_mode):
            texts, reason, _ = parse_record(data, is_json, keys, whole_file=lineno is None)
            if reason and counts is not None:
                counts[reason] = counts.get(reason, 0) + 1
            yield from texts or ()

"""Reading corpora: JSONL files, text files, folders and globs, optionally gzipped; Parquet files and
Hugging Face `datasets` saved to disk (`Dataset.save_to_disk`), read with pyarrow.

A *record* is one JSONL line, or a whole text file (`text_mode="file"`), or one line of a text file
(`text_mode="line"`), or one row of a Parquet file or a saved dataset. `parse_record` turns a record into
one text per JSON key (column) or names why it is bad. `split_ranges` cuts the input into contiguous
byte ranges (at line boundaries) so partitions can be read in parallel and still concatenate to exactly
the single-pass order. megamoe.data.records reads the records in blocks, as the preprocessing workers
take them.
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
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_DATASET_FILES = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes beside its .arrow files
HF_DATASET_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk: one saved Dataset per split folder
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


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def is_hf_dataset(path: str) -> bool:
    """A folder written by a Hugging Face `datasets` Dataset's save_to_disk."""
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in HF_DATASET_FILES)


def input_kind(path: str) -> str:
    """'hf_dataset', 'parquet', 'jsonl' or 'text'."""
    if is_hf_dataset(path):
        return "hf_dataset"
    return "parquet" if is_parquet(path) else "jsonl" if is_jsonl(path) else "text"


def input_size(path: str) -> int:
    """Bytes on disk (a saved dataset's .arrow files)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".arrow"))
    return os.path.getsize(path)


def _check_dataset_dict(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, HF_DATASET_DICT)):
        splits = sorted(d for d in os.listdir(folder) if is_hf_dataset(os.path.join(folder, d)))
        raise DataError(f"--input {folder} is a saved DatasetDict (splits: {', '.join(splits) or 'none'}); "
                        f"give one split's folder, e.g. {os.path.join(folder, splits[0] if splits else 'train')}")


def _walk(folder: str) -> list:
    """The files under a folder, sorted, hidden entries skipped; a saved dataset folder counts as one input."""
    if is_hf_dataset(folder):
        return [folder]
    _check_dataset_dict(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        datasets = sorted(d for d in dirs if not d.startswith(".") and is_hf_dataset(os.path.join(root, d)))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in datasets)
        for d in dirs:
            _check_dataset_dict(os.path.join(root, d))
        found += sorted([os.path.join(root, f) for f in files if not f.startswith(".")]
                        + [os.path.join(root, d) for d in datasets])
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
            raise DataError(f"--input {spec}: no such file, folder or glob; give JSONL, text or Parquet files, "
                            "a folder of them, a saved Hugging Face dataset, or a quoted glob such as "
                            "'data/*.jsonl.gz'")
    files = list(dict.fromkeys(files))  # keep the first occurrence of repeated paths
    if not files:
        raise DataError(f"--input {' '.join(map(str, inputs))}: no files found (the folders are empty)")
    return files


def open_binary(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _splittable(path: str, text_mode: str) -> bool:
    """Line-based files can be cut at line boundaries; gzip streams, whole-file documents, Parquet files and
    saved datasets cannot."""
    kind = input_kind(path)
    return not is_gzip(path) and (kind == "jsonl" or (kind == "text" and text_mode == "line"))


def split_ranges(files: Sequence[str], parts: int, text_mode: str = "file") -> list:
    """Cut the concatenated input into up to `parts` contiguous shards of about equal size.

    Returns a list of shards, each a list of Ranges; empty shards are dropped. Reading the shards one
    after another yields exactly the records of reading the files in order."""
    sizes = [input_size(p) for p in files]
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


def check_value(key: str, value) -> Optional[tuple]:
    """(reason, detail) when a record's value for `key` is not a usable text, else None."""
    if not isinstance(value, str):
        return "not_a_string", f"{key!r} is a {type(value).__name__}, not a string"
    if not value.strip():
        return "empty", f"{key!r} is empty"
    return None


def texts_of(obj, keys: Sequence[str]) -> tuple:
    """A decoded JSON record -> (texts, None, "") or (None, reason, detail)."""
    if not isinstance(obj, dict):
        return None, "malformed_json", (f"a JSONL line must be an object like {{\"text\": ...}}, "
                                         f"not a {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            return None, "missing_key", f"no key {key!r} (keys: {', '.join(map(repr, list(obj)[:5]))})"
        value = obj[key]
        bad = check_value(key, value)
        if bad:
            return (None,) + bad
        texts.append(value)
    return texts, None, ""


def unencodable(texts: Sequence[str]) -> Optional[tuple]:
    """("not_utf8", detail) when a text holds lone surrogates (JSON \\ud8xx escapes), which no tokenizer
    takes; the standard library's decoder lets them through, orjson refuses the line."""
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            return "not_utf8", f"text is not valid Unicode ({e.reason} at character {e.start})"
    return None


def parse_record(data: bytes, is_json: bool, keys: Sequence[str], whole_file: bool = False):
    """(texts, None, "") for a good record, (None, reason, detail) for a bad one, (None, None, "")
    for a blank line, which is not a record. The reference parser: megamoe.data.records decodes JSON
    with orjson and comes here for every line orjson refuses, so both agree on every line."""
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
    except RecursionError:
        return None, "malformed_json", "nested too deeply"
    texts, reason, detail = texts_of(obj, keys)
    bad = unencodable(texts) if texts else None
    return (None,) + bad if bad else (texts, reason, detail)


def check_keys_for_text(files: Sequence[str], keys: Sequence[str], text_mode: str) -> None:
    if text_mode not in TEXT_MODES:
        raise DataError(f"text_mode={text_mode!r}: use 'file' (one document per text file) or 'line'")
    text_files = [f for f in files if input_kind(f) == "text"]
    if text_files and list(keys) != ["text"]:
        raise DataError(f"{text_files[0]} is a text file, which has only the 'text' key, but --json-keys is "
                        f"{' '.join(keys)}; give JSONL or Parquet files or --json-keys text")

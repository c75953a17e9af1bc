"""Megatron indexed datasets on disk: checks, the tokenizer sidecar, and merging.

The format is megatron-core's (`datasets/indexed_dataset.py`): `<prefix>.bin` holds the tokens of
every document back to back; `<prefix>.idx` is a 34-byte header (magic b"MMIDIDX\\x00\\x00", version
1 as <Q, dtype code as <B, sequence count and document count as <Q) followed by the sequence lengths
(int32), sequence byte offsets (int64) and document boundaries (int64). megamoe adds a sidecar
`<prefix>.json` recording the tokenizer the tokens came from, so a mismatched --tokenizer-model is
caught before training.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Optional, Sequence

import numpy as np
from megatron.core.datasets import indexed_dataset  # noqa: F401  (the reader, re-exported for megamoe's readers)

from megamoe.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
SIDECAR_FORMAT = "megamoe-indexed-dataset-sidecar-v1"
_REPREPROCESS = "re-run tools/preprocess_data.py to write it again"


def optimal_dtype(vocab_size: int):
    """Token dtype for a vocabulary: megatron-core's rule (uint16 below 65500 pieces, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def sidecar_path(prefix: str) -> str:
    return prefix + ".json"


def read_sidecar(prefix: str) -> Optional[dict]:
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            side = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it or {_REPREPROCESS}") from None
    return side if isinstance(side, dict) and side.get("format") == SIDECAR_FORMAT else None


def check_indexed_dataset(prefix: str) -> dict:
    """Check that <prefix>.idx/.bin are a complete megatron-core indexed dataset.

    Checks the header magic, version and dtype code, that the .idx is as long as its counts imply,
    that document boundaries are consistent, and that the .bin holds exactly the tokens the index
    describes. Returns {documents, sequences, tokens, dtype}; raises DataError naming the file."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    for path in (idx, binf):
        if not os.path.isfile(path):
            hint = " (give the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
            raise DataError(f"{path} does not exist{hint}; --data-path takes the prefix of the files "
                            "tools/preprocess_data.py writes, e.g. data/corpus_text_document")
    size = os.path.getsize(idx)
    if size < HEADER_BYTES:
        raise DataError(f"{idx} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                        + _REPREPROCESS)
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if header[:9] != INDEX_HEADER:
        raise DataError(f"{idx} is not a Megatron indexed-dataset index (header {header[:9]!r}, expected "
                        f"{INDEX_HEADER!r}); {_REPREPROCESS}")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{idx} has index version {version}; only version 1 is supported; {_REPREPROCESS}")
    if code not in DTYPES:
        raise DataError(f"{idx} has unknown token dtype code {code} (known: {sorted(DTYPES)}); {_REPREPROCESS}")
    dtype = np.dtype(DTYPES[code])
    expected = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if size < expected:
        raise DataError(f"{idx} is truncated: {size} bytes, but its {sequences} sequences and {documents - 1} "
                        f"documents need {expected}; {_REPREPROCESS}")
    if size not in (expected, expected + sequences):  # + one mode byte per sequence in multimodal data
        raise DataError(f"{idx} has {size - expected} unexpected bytes after its index; {_REPREPROCESS}")
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=HEADER_BYTES)
    pointers = np.frombuffer(raw, dtype=np.int64, count=sequences, offset=HEADER_BYTES + 4 * sequences)
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=documents, offset=HEADER_BYTES + 12 * sequences)
    if documents < 1 or doc_idx[0] != 0 or doc_idx[-1] != sequences or np.any(np.diff(doc_idx) < 0):
        raise DataError(f"{idx} has inconsistent document boundaries; {_REPREPROCESS}")
    if sequences and lengths.min() < 0:
        raise DataError(f"{idx} has negative sequence lengths; {_REPREPROCESS}")
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(binf)
    if bin_size != tokens * dtype.itemsize:
        what = "truncated" if bin_size < tokens * dtype.itemsize else "longer than its index says"
        raise DataError(f"{binf} is {what}: {bin_size} bytes, but {idx} describes {tokens} {dtype.name} tokens "
                        f"= {tokens * dtype.itemsize} bytes; {_REPREPROCESS}")
    if sequences and int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize != bin_size:
        raise DataError(f"{idx} has sequence offsets that do not match {binf}; {_REPREPROCESS}")
    del raw
    return dict(documents=documents - 1, sequences=sequences, tokens=tokens, dtype=dtype.name)


def check_tokenizer_matches(prefix: str, tokenizer) -> None:
    """DataError when the data at `prefix` was not made with `tokenizer`: by the sidecar's fingerprint
    when there is one, else by token ids beyond the tokenizer's vocabulary (a sample of the .bin)."""
    side = read_sidecar(prefix)
    if side is not None:
        made = side.get("tokenizer", {})
        if made.get("fingerprint") != tokenizer.fingerprint:
            raise DataError(
                f"{prefix}: the data was preprocessed with tokenizer {made.get('model')} (vocab "
                f"{made.get('vocab_size')}, fingerprint {made.get('fingerprint')}), but --tokenizer-model "
                f"{tokenizer.path} is a different one (vocab {tokenizer.vocab_size}, fingerprint "
                f"{tokenizer.fingerprint}); pass the tokenizer the data was made with, or re-run "
                "tools/preprocess_data.py with this one")
        return
    info = check_indexed_dataset(prefix)
    count = min(info["tokens"], 1 << 22)
    sample = np.fromfile(prefix + ".bin", dtype=info["dtype"], count=count)
    if count and int(sample.max()) >= tokenizer.vocab_size:
        raise DataError(f"{prefix}.bin has token id {int(sample.max())}, but --tokenizer-model {tokenizer.path} "
                        f"has only {tokenizer.vocab_size} pieces; pass the tokenizer the data was made with")


def write_sidecar(prefix: str, tokenizer, key: str, documents: int, tokens: int, append_eod: bool,
                  inputs: Sequence[str], extra: Optional[dict] = None, path: Optional[str] = None) -> None:
    """Write the sidecar for `prefix` (to `path` when given, e.g. a temporary name)."""
    record = dict(format=SIDECAR_FORMAT, key=key, documents=documents, tokens=tokens,
                  dtype=np.dtype(optimal_dtype(tokenizer.vocab_size)).name, append_eod=append_eod,
                  tokenizer=tokenizer.describe(),
                  inputs=list(inputs)[:100], num_inputs=len(inputs), **(extra or {}))
    with open(path or sidecar_path(prefix), "w") as f:
        json.dump(record, f, indent=1)


def remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def publish(tmp_prefix: str, prefix: str) -> None:
    """Rename <tmp>.bin/.json/.idx to <prefix>.*; the .idx goes last, so its presence means complete."""
    remove_quietly(prefix + ".idx")  # never a new .bin beside an old .idx
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    if os.path.exists(tmp_prefix + ".json"):
        os.replace(tmp_prefix + ".json", prefix + ".json")
    else:
        remove_quietly(prefix + ".json")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


class IndexedWriter:
    """Writes <prefix>.bin/.idx byte for byte as megatron-core's IndexedDatasetBuilder does (add_document with
    one sequence per document, add_index, finalize), with large sequential writes: each call hands over a whole
    array of tokens, and the index is kept as numpy arrays, not Python lists (20 bytes per document)."""

    def __init__(self, bin_path: str, dtype, buffer_bytes: int = 8 << 20):
        self.dtype = np.dtype(dtype)
        self.data_file = open(bin_path, "wb", buffering=buffer_bytes)
        self.lengths: list = []  # int32 arrays: tokens per sequence
        self.doc_ends: list = []  # int64 arrays: the sequence count at the end of each document
        self.sequences = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens each, back to back in `tokens`, one sequence per document."""
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        n = len(lengths)
        self.lengths.append(np.asarray(lengths, dtype=np.int32))
        self.doc_ends.append(np.arange(self.sequences + 1, self.sequences + n + 1, dtype=np.int64))
        self.sequences += n

    def add_index(self, prefix: str) -> None:
        """Append a whole indexed dataset (its documents as they are), like IndexedDatasetBuilder.add_index."""
        info = check_indexed_dataset(prefix)
        if np.dtype(info["dtype"]) != self.dtype:
            raise DataError(f"{prefix} holds {info['dtype']} tokens, not {self.dtype.name}")
        count, docs = info["sequences"], info["documents"] + 1
        raw = np.fromfile(prefix + ".idx", dtype=np.uint8)
        self.lengths.append(raw[HEADER_BYTES:HEADER_BYTES + 4 * count].view(np.int32).copy())
        start = HEADER_BYTES + 12 * count
        self.doc_ends.append(raw[start:start + 8 * docs].view(np.int64)[1:] + self.sequences)
        self.sequences += count
        del raw
        self.data_file.flush()
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self.data_file, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        code = next(c for c, t in DTYPES.items() if np.dtype(t) == self.dtype)
        docs = 1 + sum(len(d) for d in self.doc_ends)
        with open(idx_path, "wb", buffering=8 << 20) as f:
            f.write(INDEX_HEADER + struct.pack("<QBQQ", 1, code, self.sequences, docs))
            for lengths in self.lengths:
                f.write(lengths.data)
            offset = 0  # byte offset of each sequence in the .bin: an exclusive running sum, int64
            for lengths in self.lengths:
                sizes = lengths.astype(np.int64) * self.dtype.itemsize
                pointers = np.cumsum(sizes) - sizes + offset
                f.write(pointers.data)
                offset += int(sizes.sum())
            f.write(np.zeros(1, dtype=np.int64).data)
            for ends in self.doc_ends:
                f.write(ends.data)

    def abort(self) -> None:
        self.data_file.close()  # the caller removes the temporary files


def concatenate(prefixes: Sequence[str], tmp_prefix: str, dtype) -> None:
    """Concatenate indexed datasets in order into <tmp_prefix>.bin/.idx (as megatron-core's builder would)."""
    writer = IndexedWriter(tmp_prefix + ".bin", dtype)
    try:
        for p in prefixes:
            writer.add_index(p)
    except BaseException:
        writer.abort()
        raise
    writer.finalize(tmp_prefix + ".idx")


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> dict:
    """Merge preprocessed datasets (e.g. shards made on different machines) into one, in order.

    All parts must have the same token dtype and, where they have sidecars, the same tokenizer."""
    if not prefixes:
        raise DataError("merge_datasets: no input prefixes given")
    infos = [check_indexed_dataset(p) for p in prefixes]
    if len({i["dtype"] for i in infos}) != 1:
        raise DataError(f"cannot merge datasets of different token dtypes {[i['dtype'] for i in infos]}: "
                        "preprocess them with the same tokenizer")
    sides = [read_sidecar(p) for p in prefixes]
    prints = {s["tokenizer"]["fingerprint"] for s in sides if s}
    if len(prints) > 1:
        raise DataError(f"cannot merge {list(prefixes)}: their sidecars name different tokenizers {sorted(prints)}")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        concatenate(prefixes, tmp, np.dtype(infos[0]["dtype"]).type)
        if all(sides):
            side = dict(sides[0], documents=sum(i["documents"] for i in infos),
                        tokens=sum(i["tokens"] for i in infos), merged_from=list(prefixes))
            with open(tmp + ".json", "w") as f:
                json.dump(side, f, indent=1)
        publish(tmp, output_prefix)
    finally:
        remove_quietly(tmp + ".bin", tmp + ".idx", tmp + ".json")
    return dict(documents=sum(i["documents"] for i in infos), tokens=sum(i["tokens"] for i in infos),
                output=output_prefix)

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
import struct
from typing import Optional, Sequence

import numpy as np
from megatron.core.datasets import indexed_dataset

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
                  tokenizer=dict(model=os.path.abspath(tokenizer.path) if tokenizer.path else None,
                                 fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                                 eod=tokenizer.eod, pad=tokenizer.pad),
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


def concatenate(prefixes: Sequence[str], tmp_prefix: str, dtype) -> None:
    """Concatenate indexed datasets in order into <tmp_prefix>.bin/.idx with megatron-core's builder."""
    builder = indexed_dataset.IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(tmp_prefix + ".idx")


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

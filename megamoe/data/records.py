"""Records in blocks, as the preprocessing workers take them, and a block's texts.

`read_blocks(ranges, keys, text_mode)` reads the inputs in order as Blocks of about `block_bytes`:
    "jsonl" / "lines"  whole lines of a JSONL / text file (text_mode "line"), `first` = the first line's number
                       within its Range (megamoe.data.inputs.line_base turns it into the file's line number)
    "file"             a whole text file, one record
    "rows"             rows of a Parquet file or a saved Hugging Face dataset (pyarrow, streamed: a Parquet file
                       batch by batch, a dataset's .arrow files memory-mapped), `first` = the first row's index
`parse_block(block, keys)` -> (texts, records, bad): the texts of the good records (one per key, record after
record), their count, and (position, reason, detail) of each bad record. JSON is decoded with orjson when it is
installed; a line orjson refuses goes through megamoe.data.inputs.parse_record (the standard library's json),
so the verdict on every line is exactly that of the standard library alone.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple, Optional, Sequence

from megamoe.data.inputs import (
    Range,
    check_keys_for_text,
    check_value,
    input_kind,
    open_binary,
    parse_record,
    resolve_inputs,
    texts_of,
)
from megamoe.errors import DataError

try:  # a fast JSON decoder; the standard library's is the fallback
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but megamoe works without it
    orjson = None

BLOCK_BYTES = 256 << 10  # small enough that the last blocks leave no worker idle for long


class Block(NamedTuple):
    kind: str  # "jsonl", "lines", "file" or "rows"
    source: int  # index of its Range
    first: int  # number of the first line (from 1, within the Range) or row (from 0); 0 for a whole file
    data: object  # bytes, or for rows (one list of values per key, None for a missing column; column names)
    nbytes: int  # input bytes: file bytes, or the Arrow bytes of the text columns


def _line_blocks(index: int, rng: Range, kind: str, block_bytes: int) -> Iterator[Block]:
    """Blocks of whole lines of a Range: a line belongs to the range it starts in (as inputs.iter_raw reads)."""
    with open_binary(rng.path) as f:
        if rng.start:
            f.seek(rng.start - 1)
            f.readline()  # the line in progress at `start` belongs to the previous range
        pos, line, pieces = f.tell(), 1, []
        while rng.end is None or pos < rng.end:
            chunk = f.read(block_bytes)
            if not chunk:
                data = b"".join(pieces)
                if data:
                    yield Block(kind, index, line, data, len(data))
                return
            cut = chunk.rfind(b"\n") + 1
            if not cut:  # a line longer than a block: read on
                pieces.append(chunk)
                continue
            data = b"".join(pieces + [chunk[:cut]]) if pieces else chunk[:cut]
            pieces = [chunk[cut:]] if cut < len(chunk) else []
            if rng.end is not None and pos + len(data) > rng.end:
                data = data[:data.find(b"\n", rng.end - pos - 1) + 1]  # up to the line that holds byte end - 1
                yield Block(kind, index, line, data, len(data))
                return
            yield Block(kind, index, line, data, len(data))
            line += data.count(b"\n")
            pos += len(data)


def _arrow_blocks(index: int, batches, keys: Sequence[str], names: list, block_bytes: int) -> Iterator[Block]:
    """Rows of Arrow record batches, cut into blocks of about block_bytes of text columns."""
    row = 0
    for batch in batches:
        columns = [batch.column(k) if k in batch.schema.names else None for k in keys]
        size = sum(c.nbytes for c in columns if c is not None)
        step = max(1, int(batch.num_rows * block_bytes / size)) if size else max(batch.num_rows, 1)
        for start in range(0, batch.num_rows, step):
            part = [None if c is None else c.slice(start, step) for c in columns]
            n = min(step, batch.num_rows - start)
            values = [None if c is None else c.to_pylist() for c in part]
            yield Block("rows", index, row, (values, names, n), sum(c.nbytes for c in part if c is not None))
            row += n


def _parquet_blocks(index: int, path: str, keys: Sequence[str], block_bytes: int) -> Iterator[Block]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is a Parquet file, which needs pyarrow: pip install 'megamoe[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}); "
                        "check the file or give it another suffix") from None
    names = pf.schema_arrow.names
    present = [k for k in keys if k in names] or names[:1]  # none of the keys: read one column for the row count
    rows = max(1, min(4096, pf.metadata.num_rows or 1))
    yield from _arrow_blocks(index, pf.iter_batches(batch_size=rows, columns=present), keys, names, block_bytes)


def _hf_dataset_blocks(index: int, folder: str, keys: Sequence[str], block_bytes: int) -> Iterator[Block]:
    """A Dataset.save_to_disk folder: its .arrow files (Arrow IPC streams) in state.json's order, memory-mapped."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{folder} is a saved Hugging Face dataset, which needs pyarrow: "
                        "pip install 'megamoe[hf]'") from None
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        files = [os.path.join(folder, d["filename"]) for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}/state.json does not list the dataset's files ({e}); save the dataset again "
                        "with Dataset.save_to_disk") from None
    if state.get("_indices_data_files"):
        raise DataError(f"{folder} holds an indices mapping; save it with Dataset.flatten_indices() first")

    def batches():
        for path in files:
            try:
                with pa.memory_map(path) as source:
                    yield from pa.ipc.open_stream(source)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{path} is not a readable Arrow file of a saved dataset ({e}); save the dataset "
                                "again with Dataset.save_to_disk") from None

    names = []
    if files and os.path.isfile(files[0]):
        with pa.memory_map(files[0]) as source:
            names = pa.ipc.open_stream(source).schema.names
    yield from _arrow_blocks(index, batches(), keys, names, block_bytes)


def read_blocks(ranges: Sequence[Range], keys: Sequence[str], text_mode: str = "file",
                block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The records of `ranges`, in order, in blocks (see the module's doc)."""
    for index, rng in enumerate(ranges):
        kind = input_kind(rng.path)
        if kind == "jsonl" or (kind == "text" and text_mode == "line"):
            yield from _line_blocks(index, rng, "jsonl" if kind == "jsonl" else "lines", block_bytes)
        elif kind == "text":
            with open_binary(rng.path) as f:
                data = f.read()
            yield Block("file", index, 0, data, len(data))
        elif kind == "parquet":
            yield from _parquet_blocks(index, rng.path, keys, block_bytes)
        else:
            yield from _hf_dataset_blocks(index, rng.path, keys, block_bytes)


def _json_lines(data: bytes, first: int, keys: Sequence[str], texts: list, bad: list) -> int:
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    good = 0
    loads = orjson.loads if orjson is not None else None
    for n, line in enumerate(lines, first):
        if loads is not None:
            try:
                got, reason, detail = texts_of(loads(line), keys)
            except ValueError:  # orjson.JSONDecodeError: the reference parser has the last word
                got, reason, detail = parse_record(line, True, keys)
        else:
            got, reason, detail = parse_record(line, True, keys)
        if got:
            texts += got
            good += 1
        elif reason:
            bad.append((n, reason, detail))
    return good


def _text_lines(data: bytes, first: int, texts: list, bad: list) -> int:
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # find the bad lines one by one
        lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    good = 0
    for n, line in enumerate(lines, first):
        if isinstance(line, bytes):
            got, reason, detail = parse_record(line, False, ("text",))
            if reason:
                bad.append((n, reason, detail))
                continue
            line = got[0] if got else ""
        line = line.rstrip("\r\n")
        if line.strip():
            texts.append(line)
            good += 1
    return good


def _rows(data: tuple, first: int, keys: Sequence[str], texts: list, bad: list) -> int:
    columns, names, rows = data
    missing = next((k for k, c in zip(keys, columns) if c is None), None)
    if missing is not None:  # the file has no such column: every row lacks the key
        detail = f"no key {missing!r} (keys: {', '.join(map(repr, names[:5]))})"
        bad += [(first + r, "missing_key", detail) for r in range(rows)]
        return 0
    good = 0
    for r in range(rows):
        got, problem = [], None
        for key, column in zip(keys, columns):
            value = column[r]
            if isinstance(value, bytes):  # a binary column
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    problem = ("not_utf8", f"invalid UTF-8 byte 0x{value[e.start]:02x} at byte {e.start}")
                    break
            problem = check_value(key, value)
            if problem:
                break
            got.append(value)
        if problem:
            bad.append((first + r,) + problem)
        else:
            texts += got
            good += 1
    return good


def parse_block(block: Block, keys: Sequence[str]) -> tuple:
    """(texts, good records, bad records as (line / row / None, reason, detail))."""
    texts: list = []
    bad: list = []
    if block.kind == "jsonl":
        good = _json_lines(block.data, block.first, keys, texts, bad)
    elif block.kind == "lines":
        good = _text_lines(block.data, block.first, texts, bad)
    elif block.kind == "file":
        got, reason, detail = parse_record(block.data, False, keys, whole_file=True)
        texts, good = got or [], int(bool(got))
        if reason:
            bad.append((None, reason, detail))
    else:
        good = _rows(block.data, block.first, keys, texts, bad)
    return texts, good, bad


def iter_texts(inputs: Sequence[str] | str, keys: Sequence[str] = ("text",), text_mode: str = "file",
               counts: Optional[dict] = None) -> Iterator[str]:
    """Every good text of the inputs (all keys of a record in order); bad records are counted in
    `counts` by reason and skipped."""
    files = resolve_inputs(inputs)
    check_keys_for_text(files, keys, text_mode)
    for block in read_blocks([Range(f) for f in files], keys, text_mode):
        texts, _, bad = parse_block(block, keys)
        if counts is not None:
            for _, reason, _ in bad:
                counts[reason] = counts.get(reason, 0) + 1
        yield from texts

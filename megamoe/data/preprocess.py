"""Corpus -> Megatron indexed datasets `<prefix>_<key>_document.bin/.idx` (+ a `.json` tokenizer sidecar).

Same flags and output as Megatron-LM's tools/preprocess_data.py: the files are byte for byte what
megatron-core's IndexedDatasetBuilder writes (megamoe.data.indexed.IndexedWriter, with large sequential
writes). The work is split where it is cheapest to move:
- the main process reads the input in blocks of whole records (megamoe.data.records: ~256 KB of JSONL or text
  lines, a whole text file, or rows of a Parquet file or a saved Hugging Face dataset) and writes the tokens;
- `workers=N` processes each take a block, decode its JSON (orjson), encode all its texts in one batch call
  of the tokenizer (one thread each), and send back one numpy array of tokens and one of lengths per key (no
  lists of ints are pickled); the main process writes them in input order. With workers=1 the main process
  does it all itself.
- `partitions=P`: the input is cut into P contiguous shards at line boundaries; each shard is read,
  encoded and written to its own .bin/.idx by one worker (up to `workers` at once), and the shards
  are concatenated in order at the end (no tokens travel between processes).
Every way gives byte-identical output. Bad records (malformed JSON, missing key, non-string value, non-UTF-8
bytes, empty text) are counted, the first few reported with file and line (or row), and skipped; `strict=True`
stops at the first one instead. Everything is written under temporary names and renamed at the end, so a
failed run leaves nothing under the final names.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from megamoe.data.indexed import IndexedWriter, concatenate, optimal_dtype, publish, remove_quietly, write_sidecar
from megamoe.data.inputs import (
    Range,
    check_keys_for_text,
    input_kind,
    input_size,
    is_gzip,
    line_base,
    resolve_inputs,
    split_ranges,
)
from megamoe.data.records import Block, parse_block, read_blocks
from megamoe.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer
from megamoe.errors import DataError
from megamoe.logging import get_logger

log = get_logger()
MAX_EXAMPLES = 5  # bad records reported with file and line


@dataclass
class _Job:
    """What every process needs to encode records (picklable: the tokenizer pickles as its model's bytes)."""

    tokenizer: Tokenizer
    keys: tuple
    append_eod: bool
    strict: bool
    text_mode: str
    dtype: type


@dataclass
class _Result:
    """Tokens and counts of a block, a shard, or the whole run."""

    tokens: list = field(default_factory=list)  # per key: the block's tokens, one array
    lengths: list = field(default_factory=list)  # per key: int32 tokens per document
    docs: int = 0
    tokens_per_key: Counter = field(default_factory=Counter)
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # (range index, block kind, line / row / None, reason, detail)
    fatal: Optional[tuple] = None  # the first bad record, when strict

    def merge_counts(self, other: "_Result") -> None:
        self.docs += other.docs
        self.bytes += other.bytes
        self.tokens_per_key.update(other.tokens_per_key)
        self.skipped.update(other.skipped)
        self.examples += other.examples[: MAX_EXAMPLES - len(self.examples)]


_WORKER: dict = {}


def _init_worker(job: _Job, counters=None) -> None:
    if isinstance(job.tokenizer, HuggingFaceTokenizer):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: --workers is the cores
    _WORKER.update(job=job, counters=counters)


def _encode_block(block: Block) -> _Result:
    """Parse a block's records and encode all its texts in one batch."""
    job = _WORKER["job"]
    tok = job.tokenizer
    out = _Result(bytes=block.nbytes)
    texts, out.docs, bad = parse_block(block, job.keys)
    for pos, reason, detail in bad:
        out.skipped[reason] += 1
        if len(out.examples) < MAX_EXAMPLES:
            out.examples.append((block.source, block.kind, pos, reason, detail))
    if bad and job.strict:
        out.fatal = (block.source, block.kind) + bad[0]
        return out
    ids = tok.encode_batch(texts) if texts else []
    keys = len(job.keys)
    for k, key in enumerate(job.keys):
        docs = ids[k::keys] if keys > 1 else ids
        if job.append_eod:
            for doc in docs:
                doc.append(tok.eod)
        lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
        total = int(lengths.sum(dtype=np.int64))
        out.tokens.append(np.fromiter(itertools.chain.from_iterable(docs), dtype=job.dtype, count=total))
        out.lengths.append(lengths)
        out.tokens_per_key[key] += total
    return out


class _Writer:
    """One IndexedWriter per JSON key, at temporary prefixes."""

    def __init__(self, prefixes: Sequence[str], dtype):
        self.prefixes = list(prefixes)
        self.writers = [IndexedWriter(p + ".bin", dtype) for p in self.prefixes]

    def add(self, result: _Result) -> None:
        for writer, tokens, lengths in zip(self.writers, result.tokens, result.lengths):
            writer.add_documents(tokens, lengths)

    def finalize(self) -> None:
        for writer, prefix in zip(self.writers, self.prefixes):
            writer.finalize(prefix + ".idx")

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


def _where(ranges: Sequence[Range], rng: int, kind: str, pos: Optional[int], bases: dict) -> str:
    r = ranges[rng]
    if pos is None:
        return r.path
    if kind == "rows":
        return f"{r.path}:row {pos}"
    if rng not in bases:
        bases[rng] = line_base(r)
    return f"{r.path}:{bases[rng] + pos}"


def _fatal_error(ranges, fatal, bases) -> DataError:
    rng, kind, pos, reason, detail = fatal
    return DataError(f"{_where(ranges, rng, kind, pos, bases)}: {reason}: {detail}; fix or remove the record, "
                     "or run without --strict to skip bad records")


def _finish(result: _Result, ranges: Sequence[Range]) -> _Result:
    """Turn (range, line) of examples into 'file:line' strings."""
    bases: dict = {}
    result.examples = [f"{_where(ranges, r, kind, pos, bases)}: {reason}: {detail}"
                       for r, kind, pos, reason, detail in result.examples]
    return result


class _Progress:
    """A tqdm bar on a terminal (bytes, docs/s); otherwise a log line every `log_interval` documents."""

    def __init__(self, total_bytes: Optional[int], log_interval: int, enabled: bool):
        self.start = time.perf_counter()
        self.log_interval, self.next_log = log_interval, log_interval
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", leave=False)

    def show(self, docs: int, nbytes: int) -> None:
        rate = docs / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes - self.bar.n)
            self.bar.set_postfix_str(f"{docs} docs, {rate:.0f} docs/s", refresh=False)
        elif self.enabled and self.log_interval and docs >= self.next_log:
            mb = nbytes / 1e6 / max(time.perf_counter() - self.start, 1e-9)
            log.info(f"processed {docs} documents ({rate:.0f} docs/s, {mb:.2f} MB/s)")
            self.next_log = (docs // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_stream(ranges, job: _Job, out_prefixes, workers: int, progress: Optional[_Progress], counters=None):
    """Read `ranges` in order, encode (in-process or on a pool of `workers`), write to out_prefixes."""
    writer = _Writer(out_prefixes, job.dtype)
    total = _Result()

    def consume(result: _Result) -> None:
        if result.fatal:
            raise _fatal_error(ranges, result.fatal, {})
        writer.add(result)
        total.merge_counts(result)
        if counters is not None:  # shared with the main process, which shows progress
            with counters[0].get_lock():
                counters[0].value += result.docs
                counters[1].value += result.bytes
        elif progress is not None:
            progress.show(total.docs, total.bytes)

    try:
        blocks = read_blocks(ranges, job.keys, job.text_mode)
        if workers <= 1:
            if _WORKER.get("job") is not job:
                _init_worker(job)
            for block in blocks:
                consume(_encode_block(block))
        else:
            with _context().Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                pending: deque = deque()  # a bounded window keeps memory flat and the output in order
                for block in blocks:
                    pending.append(pool.apply_async(_encode_block, (block,)))
                    if len(pending) >= 4 * workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
    return _finish(total, ranges)


def _run_shard(args) -> _Result:
    """One partition, in a worker process: its ranges to its own .bin/.idx."""
    ranges, out_prefixes = args
    return _run_stream(ranges, _WORKER["job"], out_prefixes, 1, None, _WORKER["counters"])


def _context():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _run_partitions(shards, job: _Job, tmp_prefixes, workers: int, progress: _Progress, temps: list) -> _Result:
    parts = [[f"{p}.part{i}" for p in tmp_prefixes] for i in range(len(shards))]
    for part in parts:
        temps += [p + ext for p in part for ext in (".bin", ".idx")]
    total = _Result()
    ctx = _context()
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    with ctx.Pool(min(workers, len(shards)), initializer=_init_worker, initargs=(job, counters)) as pool:
        pending = [pool.apply_async(_run_shard, ((shard, part),)) for shard, part in zip(shards, parts)]
        while not all(p.ready() for p in pending):
            if any(p.ready() and not p.successful() for p in pending):
                break  # a shard failed (e.g. strict): stop the others, report it below
            progress.show(counters[0].value, counters[1].value)
            time.sleep(0.2)
        for p in pending:
            result = p.get()  # re-raises a shard's DataError
            total.merge_counts(result)
            total.examples = total.examples[:MAX_EXAMPLES]
    for k, tmp in enumerate(tmp_prefixes):
        concatenate([part[k] for part in parts], tmp, job.dtype)
        for part in parts:
            remove_quietly(part[k] + ".bin", part[k] + ".idx")
    return total


def preprocess(inputs: Sequence[str] | str, tokenizer_model: str, output_prefix: str,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               partitions: int = 1, strict: bool = False, log_interval: int = 10000, text_mode: str = "file",
               progress: bool = True, tokenizer_type: Optional[str] = None) -> dict:
    """Tokenize the inputs (JSONL, text files, folders, globs, .gz, Parquet files, saved Hugging Face datasets)
    into `<output_prefix>_<key>_document` .bin/.idx/.json for each JSON key (column); `tokenizer_model` is a
    sentencepiece .model or a Hugging Face tokenizer folder (`tokenizer_type` as load_tokenizer takes it).
    Returns stats: documents, tokens, tokens_per_key, skipped (by reason), examples (first bad records as
    'file:line: reason: detail', 'file:row N: ...' for rows), bytes, seconds, docs_per_s, mb_per_s, outputs
    (key -> prefix)."""
    start = time.perf_counter()
    keys = tuple(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise DataError(f"--json-keys {' '.join(keys)}: give one or more distinct keys")
    if workers < 1 or partitions < 1:
        raise DataError(f"--workers {workers} and --partitions {partitions} must be >= 1")
    files = resolve_inputs(inputs)
    check_keys_for_text(files, keys, text_mode)
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    job = _Job(tokenizer, keys, append_eod, strict, text_mode, optimal_dtype(tokenizer.vocab_size))
    outputs = {k: f"{output_prefix}_{k}_document" for k in keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_prefixes = [f"{outputs[k]}.{tag}" for k in keys]
    temps = [p + ext for p in tmp_prefixes for ext in (".bin", ".idx", ".json")]
    shards = split_ranges(files, partitions, text_mode) if partitions > 1 else [[Range(f) for f in files]]
    streamed = any(is_gzip(f) or input_kind(f) in ("parquet", "hf_dataset") for f in files)
    total_bytes = None if streamed else sum(input_size(f) for f in files)
    bar = _Progress(total_bytes, log_interval, progress)
    try:
        if len(shards) > 1:
            result = _run_partitions(shards, job, tmp_prefixes, workers, bar, temps)
        else:
            result = _run_stream(shards[0], job, tmp_prefixes, workers, bar)
        bar.show(result.docs, result.bytes)
        if result.docs == 0:
            raise DataError(f"no documents in {' '.join(map(str, inputs))}: "
                            + (f"all {sum(result.skipped.values())} records were bad ("
                               + ", ".join(f"{r} {n}" for r, n in sorted(result.skipped.items())) + "); first: "
                               + "; ".join(result.examples[:2]) if result.skipped else "the input is empty"))
        for k, tmp in zip(keys, tmp_prefixes):
            write_sidecar(outputs[k], tokenizer, k, result.docs, result.tokens_per_key[k], append_eod, files,
                          extra=dict(skipped=dict(result.skipped)), path=tmp + ".json")
        for k, tmp in zip(keys, tmp_prefixes):
            publish(tmp, outputs[k])
    finally:
        bar.close()
        remove_quietly(*temps)
    seconds = time.perf_counter() - start
    stats = dict(documents=result.docs, tokens=sum(result.tokens_per_key.values()),
                 tokens_per_key=dict(result.tokens_per_key), skipped=dict(result.skipped),
                 examples=result.examples, bytes=result.bytes, seconds=seconds,
                 docs_per_s=result.docs / seconds, mb_per_s=result.bytes / 1e6 / seconds,
                 outputs=outputs, workers=workers, partitions=len(shards))
    if result.skipped:
        log.warning(f"skipped {sum(result.skipped.values())} bad records ("
                    + ", ".join(f"{r} {n}" for r, n in sorted(result.skipped.items())) + "); first ones:\n  "
                    + "\n  ".join(result.examples))
    return stats

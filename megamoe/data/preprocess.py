"""Corpus -> Megatron indexed datasets `<prefix>_<key>_document.bin/.idx` (+ a `.json` tokenizer sidecar).

Same flags and output as Megatron-LM's tools/preprocess_data.py, written with megatron-core's
IndexedDatasetBuilder. Two ways to use several processes, both giving byte-identical output to one:
- `workers=N`: the main process reads records and writes tokens; N worker processes parse and encode
  batches of records, results are written in input order.
- `partitions=P`: the input is cut into P contiguous shards at line boundaries; each shard is read,
  encoded and written to its own .bin/.idx by one worker (up to `workers` at once), and the shards
  are concatenated in order at the end (no tokens travel between processes).
Bad records (malformed JSON, missing key, non-string value, non-UTF-8 bytes, empty text) are counted,
the first few reported with file and line, and skipped; `strict=True` stops at the first one instead.
Everything is written under temporary names and renamed at the end, so a failed run leaves nothing
under the final names.
"""
from __future__ import annotations

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

from megamoe.data.indexed import concatenate, indexed_dataset, optimal_dtype, publish, remove_quietly, write_sidecar
from megamoe.data.inputs import (
    Range,
    check_keys_for_text,
    is_gzip,
    is_jsonl,
    iter_raw,
    line_base,
    parse_record,
    resolve_inputs,
    split_ranges,
)
from megamoe.data.tokenizer import Tokenizer, load_tokenizer
from megamoe.errors import DataError
from megamoe.logging import get_logger

log = get_logger()
MAX_EXAMPLES = 5  # bad records reported with file and line
BATCH_RECORDS, BATCH_BYTES = 512, 1 << 20


@dataclass
class _Job:
    """What every process needs to encode records (picklable)."""

    model_proto: bytes
    keys: tuple
    append_eod: bool
    strict: bool
    text_mode: str
    dtype: type


@dataclass
class _Result:
    """Tokens and counts of a batch, a shard, or the whole run."""

    tokens: list = field(default_factory=list)  # per key: int32 tokens of the batch's documents
    lengths: list = field(default_factory=list)  # per key: token count per document
    docs: int = 0
    tokens_per_key: Counter = field(default_factory=Counter)
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # (range index, line or None, reason, detail)
    fatal: Optional[tuple] = None  # the first bad record, when strict

    def merge_counts(self, other: "_Result") -> None:
        self.docs += other.docs
        self.bytes += other.bytes
        self.tokens_per_key.update(other.tokens_per_key)
        self.skipped.update(other.skipped)
        self.examples += other.examples[: MAX_EXAMPLES - len(self.examples)]


_WORKER: dict = {}


def _init_worker(job: _Job, counters=None) -> None:
    _WORKER.update(job=job, tokenizer=Tokenizer(job.model_proto), counters=counters)


def _encode_batch(batch: list) -> _Result:
    """Parse and encode a batch of (range index, is_json, line, raw bytes) records."""
    job, tok = _WORKER["job"], _WORKER["tokenizer"]
    out = _Result()
    ids = [[] for _ in job.keys]
    lengths = [[] for _ in job.keys]
    for rng, is_json, line, data in batch:
        out.bytes += len(data)
        texts, reason, detail = parse_record(data, is_json, job.keys, whole_file=line is None)
        encoded = []
        if texts:
            try:
                encoded = [tok.sp.encode(t) for t in texts]
            except RuntimeError:  # sentencepiece cannot take lone surrogates (from JSON \ud8xx escapes)
                reason, detail = _unencodable(texts)
        if reason:
            out.skipped[reason] += 1
            if len(out.examples) < MAX_EXAMPLES:
                out.examples.append((rng, line, reason, detail))
            if job.strict:
                out.fatal = (rng, line, reason, detail)
                break
            continue
        if not encoded:
            continue  # a blank line: not a record
        for k, doc in enumerate(encoded):
            if job.append_eod:
                doc.append(tok.eod)
            ids[k].extend(doc)
            lengths[k].append(len(doc))
            out.tokens_per_key[job.keys[k]] += len(doc)
        out.docs += 1
    out.tokens = [np.array(x, dtype=job.dtype) for x in ids]
    out.lengths = lengths
    return out


def _unencodable(texts: list) -> tuple:
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            return "not_utf8", f"text is not valid Unicode ({e.reason} at character {e.start})"
    raise  # not an encoding problem: let the caller's error through


def _batches(ranges: Sequence[Range], text_mode: str):
    batch, size = [], 0
    for i, rng in enumerate(ranges):
        is_json = is_jsonl(rng.path)
        for line, data in iter_raw(rng, text_mode):
            batch.append((i, is_json, line, data))
            size += len(data)
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _Writer:
    """One megatron-core IndexedDatasetBuilder per JSON key, at temporary prefixes."""

    def __init__(self, prefixes: Sequence[str], dtype):
        builder = indexed_dataset.IndexedDatasetBuilder
        self.prefixes = list(prefixes)
        self.builders = [builder(p + ".bin", dtype=dtype) for p in self.prefixes]

    def add(self, result: _Result) -> None:
        for builder, tokens, lengths in zip(self.builders, result.tokens, result.lengths):
            offset = 0
            for n in lengths:
                builder.add_document(tokens[offset:offset + n], [n])
                offset += n

    def finalize(self) -> None:
        for builder, prefix in zip(self.builders, self.prefixes):
            builder.finalize(prefix + ".idx")

    def abort(self) -> None:
        for builder in self.builders:
            builder.data_file.close()  # the caller removes the temporary files


def _where(ranges: Sequence[Range], rng: int, line: Optional[int], bases: dict) -> str:
    r = ranges[rng]
    if line is None:
        return r.path
    if rng not in bases:
        bases[rng] = line_base(r)
    return f"{r.path}:{bases[rng] + line}"


def _fatal_error(ranges, fatal, bases) -> DataError:
    rng, line, reason, detail = fatal
    return DataError(f"{_where(ranges, rng, line, bases)}: {reason}: {detail}; fix or remove the record, "
                     "or run without --strict to skip bad records")


def _finish(result: _Result, ranges: Sequence[Range]) -> _Result:
    """Turn (range, line) of examples into 'file:line' strings."""
    bases: dict = {}
    result.examples = [f"{_where(ranges, r, ln, bases)}: {reason}: {detail}"
                       for r, ln, reason, detail in result.examples]
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
        if workers <= 1:
            if not _WORKER or _WORKER["job"] is not job:
                _init_worker(job)
            for batch in _batches(ranges, job.text_mode):
                consume(_encode_batch(batch))
        else:
            with _context().Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                pending: deque = deque()  # a bounded window keeps memory flat and the output in order
                for batch in _batches(ranges, job.text_mode):
                    pending.append(pool.apply_async(_encode_batch, (batch,)))
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
               progress: bool = True) -> dict:
    """Tokenize the inputs (JSONL, text files, folders, globs, .gz) into `<output_prefix>_<key>_document`
    .bin/.idx/.json for each JSON key; returns stats: documents, tokens, tokens_per_key, skipped (by
    reason), examples (first bad records as 'file:line: reason: detail'), bytes, seconds, docs_per_s,
    mb_per_s, outputs (key -> prefix)."""
    start = time.perf_counter()
    keys = tuple(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise DataError(f"--json-keys {' '.join(keys)}: give one or more distinct keys")
    if workers < 1 or partitions < 1:
        raise DataError(f"--workers {workers} and --partitions {partitions} must be >= 1")
    files = resolve_inputs(inputs)
    check_keys_for_text(files, keys, text_mode)
    tokenizer = load_tokenizer(tokenizer_model)
    job = _Job(tokenizer._proto, keys, append_eod, strict, text_mode, optimal_dtype(tokenizer.vocab_size))
    outputs = {k: f"{output_prefix}_{k}_document" for k in keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_prefixes = [f"{outputs[k]}.{tag}" for k in keys]
    temps = [p + ext for p in tmp_prefixes for ext in (".bin", ".idx", ".json")]
    shards = split_ranges(files, partitions, text_mode) if partitions > 1 else [[Range(f) for f in files]]
    total_bytes = None if any(is_gzip(f) for f in files) else sum(os.path.getsize(f) for f in files)
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

"""Perplexity of a model on held-out text: preprocessed dataset splits, whole .bin/.idx prefixes, or raw files.

    evaluate_perplexity(model, batches)                         {loss, ppl, tokens, batches}
    dataset_batches(data_path, seq_length, batch_size, part)    a dataset's train / valid / test part, or all
    text_batches(inputs, tokenizer, seq_length, batch_size)     JSONL / text files tokenized on the fly

Every token of the source is scored once, in order: the tokens (documents joined by their EOD, as training
sees them) are cut into windows of seq_length + 1 that overlap by one token, each window predicting its last
seq_length tokens from the ones before it, with no context carried from one window to the next. The last,
shorter window is a batch of its own, so nothing is padded and a text of n tokens scores n - 1.

The loss is the token-weighted mean of the LM cross entropy over the loss mask (the MoE auxiliary losses are
not part of it), and ppl = exp(loss). MoE layers run as configured (capacity_factor and all); pass
capacity_factor=0 to score every token with its expert.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from megamoe.config import parse_data_path
from megamoe.data.datasets import split_document_ranges
from megamoe.data.indexed import check_indexed_dataset, check_tokenizer_matches, indexed_dataset
from megamoe.data.inputs import check_keys_for_text, resolve_inputs
from megamoe.data.records import iter_texts
from megamoe.errors import DataError
from megamoe.model import moe_capacity

PARTS = ("train", "valid", "test", "all")


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable[dict], max_batches: Optional[int] = None,
                        capacity_factor: Optional[float] = None) -> dict:
    """Token-weighted mean LM loss of a whole model over `batches` (dicts of tokens, labels and optionally
    loss_mask, each (batch, L)); returns {loss, ppl, tokens, batches}. capacity_factor: run the MoE layers with
    this one instead of the configured one (0: no token dropped)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("evaluate_perplexity needs the whole model (embedding to LM head), not a pipeline stage")
    device = model.embedding.weight.device
    total, count, seen = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with moe_capacity(model, capacity_factor):
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
                mask = batch.get("loss_mask")
                mask = torch.ones(labels.shape, device=device) if mask is None else mask.to(device)
                per_token = model.cross_entropy(model(tokens).logits, labels)  # (batch, L), fp32
                total += float((per_token.double() * mask.double()).sum())
                count += float(mask.double().sum())
                seen += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no tokens to evaluate: the batches are empty or fully masked")
    loss = total / count
    return dict(loss=loss, ppl=math.exp(loss) if loss < 700 else float("inf"), tokens=int(count), batches=seen)


def token_batches(chunks: Iterable, seq_length: int, batch_size: int, vocab_size: Optional[int] = None,
                  source: str = "the data") -> Iterator[dict]:
    """Batches of windows over the concatenation of `chunks` (arrays of token ids), as the module docstring
    says: (batch_size, seq_length) tokens / labels / loss_mask, and last the shorter tail window alone."""
    if seq_length < 1 or batch_size < 1:
        raise DataError(f"--seq-length {seq_length} and --batch-size {batch_size} must be >= 1")
    buffer, rows = np.zeros(0, dtype=np.int64), []

    def batch_of(windows: list) -> dict:
        ids = torch.from_numpy(np.stack(windows))
        return dict(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(ids.shape[0], ids.shape[1] - 1))

    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.int64)
        if vocab_size is not None and chunk.size and int(chunk.max()) >= vocab_size:
            raise DataError(f"{source} has token id {int(chunk.max())}, beyond the model's vocabulary of "
                            f"{vocab_size}; it was tokenized with another tokenizer than the model's")
        buffer = np.concatenate([buffer, chunk])
        while len(buffer) >= seq_length + 1:
            rows.append(buffer[:seq_length + 1])
            buffer = buffer[seq_length:]  # the last token is the first input of the next window
            if len(rows) == batch_size:
                yield batch_of(rows)
                rows = []
    if rows:
        yield batch_of(rows)
    if len(buffer) > 1:
        yield batch_of([buffer])


def part_sequences(prefix: str, part: str = "all", split: str = "949,50,1") -> range:
    """Indices of the sequences of `prefix` in one part of --split (megatron-core's GPTDataset splits by
    sequence, with this rounding), or all of them."""
    if part not in PARTS:
        raise DataError(f"part {part!r}: use one of {', '.join(PARTS)}")
    info = check_indexed_dataset(prefix)
    if part == "all":
        return range(info["sequences"])
    weights = split.split(",")
    try:
        ok = len(weights) == 3 and min(map(float, weights)) >= 0 and sum(map(float, weights)) > 0
    except ValueError:
        ok = False
    if not ok:
        raise DataError(f"split weights {split!r}: give three numbers >= 0 for train,valid,test, e.g. 949,50,1")
    bounds = split_document_ranges(info["sequences"], split)[PARTS.index(part)]
    if bounds is None or bounds[0] >= bounds[1]:
        raise DataError(f"{prefix}: the {part} part of --split {split} holds none of its {info['sequences']} "
                        "documents; evaluate another part, give the split other weights, or use --data-path alone "
                        "to evaluate the whole dataset")
    return range(*bounds)


def dataset_chunks(data_path: Sequence[str], part: str = "all", split: str = "949,50,1",
                   tokenizer=None) -> Iterator[np.ndarray]:
    """The token arrays of one part of each preprocessed dataset prefix, in order; the files (and the tokenizer,
    when given) are checked before this returns."""
    prefixes, weights = parse_data_path(data_path)
    if weights is not None:
        raise DataError(f"--data-path {' '.join(map(str, data_path))}: blend weights mean nothing for evaluation "
                        "(every token is scored once); give the prefixes alone")
    parts = []
    for prefix in prefixes:
        indices = part_sequences(prefix, part, split)
        if tokenizer is not None:
            check_tokenizer_matches(prefix, tokenizer)
        parts.append((prefix, indices))
    return _read_sequences(parts)


def _read_sequences(parts: list) -> Iterator[np.ndarray]:
    IndexedDataset = indexed_dataset.IndexedDataset
    for prefix, indices in parts:
        dataset = IndexedDataset(prefix)
        for i in indices:
            yield np.array(dataset[i], dtype=np.int64)  # a copy: the dataset's memory map closes with it


def dataset_batches(data_path: Sequence[str], seq_length: int, batch_size: int, part: str = "all",
                    split: str = "949,50,1", tokenizer=None, vocab_size: Optional[int] = None) -> Iterator[dict]:
    """Evaluation batches of a preprocessed dataset: `part` (train / valid / test of `split`, or all)."""
    chunks = dataset_chunks(data_path, part, split, tokenizer)
    return token_batches(chunks, seq_length, batch_size, vocab_size, source=" ".join(map(str, data_path)))


def text_chunks(inputs, tokenizer, json_keys: Sequence[str] = ("text",), text_mode: str = "file",
                append_eod: bool = True) -> Iterator[list]:
    """Token ids of each text of JSONL / text files (tools/preprocess_data.py's reading), EOD appended."""
    files = resolve_inputs(inputs)  # a missing file fails here, not at the first batch
    check_keys_for_text(files, json_keys, text_mode)
    return (tokenizer.encode(text) + ([tokenizer.eod] if append_eod else [])
            for text in iter_texts(files, json_keys, text_mode))


def text_batches(inputs, tokenizer, seq_length: int, batch_size: int, json_keys: Sequence[str] = ("text",),
                 text_mode: str = "file", vocab_size: Optional[int] = None) -> Iterator[dict]:
    """Evaluation batches of raw JSONL / text files, tokenized on the fly."""
    chunks = text_chunks(inputs, tokenizer, json_keys, text_mode)
    return token_batches(chunks, seq_length, batch_size, vocab_size, source=str(inputs))

"""Train and validation data for a run: megatron-core's GPTDataset and BlendedMegatronDatasetBuilder,
sharded over data-parallel ranks in Megatron's sample order and resumable from consumed samples.

Sample order (MegatronPretrainingSampler's): step s trains on samples [c, c + global_batch) of the
train dataset, c = consumed samples; micro-batch j of DP rank r holds samples
c + j*mbs*dp + r*mbs ... + mbs. So any DP size sees the same global batches, and a run resumed at
c yields exactly what an uninterrupted run yields after c samples. Samples hold seq_length + 1
tokens: tokens = sample[:-1], labels = sample[1:]. loss_mask is 1 except where the label is padding
(megatron-core pads only a partial last sample; EOD tokens are learned, not masked).

Validation uses the first eval_iters x global_batch samples of the valid split, the same ones at every
evaluation, arranged as the train batches are; the test split is held out and never built.
Megatron-core caches the shuffled sample indices under `<data dir>/index_cache/` (a temp folder when
that is not writable); under torch.distributed rank 0 builds them first and the others read them, so
that folder must be on a filesystem every rank sees (as in Megatron-LM).
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import signal
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megamoe.config import parse_data_path
from megamoe.data.indexed import check_indexed_dataset, check_tokenizer_matches
from megamoe.data.packing import add_document_fields
from megamoe.data.tokenizer import load_tokenizer
from megamoe.errors import DataError
from megamoe.logging import get_logger

log = get_logger()


def split_document_ranges(num_docs: int, split: str) -> list:
    """[beg, end) documents of train/valid/test for --split, with megatron-core's rounding."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * num_docs)), int(round(m[1] * num_docs))) for m in matrix]


def _cache_dir(prefixes: Sequence[str], cache_path: Optional[str]) -> str:
    if cache_path:
        return cache_path
    folder = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), "megamoe_index_cache")


class _Builder(BlendedMegatronDatasetBuilder):
    """Without torch.distributed, megatron-core's BlendedDataset asks for the rank when its cache misses; there
    it builds its (cheap) blending index without the cache instead."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is not BlendedDataset or torch.distributed.is_initialized():
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)
        datasets, weights, size, config = args
        config = copy.copy(config)
        config.path_to_cache = None
        quiet = logging.getLogger("megatron.core.datasets.blended_dataset")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it warns that it has no cache, which is the point here
        try:
            return cls(datasets, weights, size, config)
        finally:
            quiet.setLevel(level)


def build_gpt_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int, tokenizer,
                       num_train: int, num_valid: int, cache_path: Optional[str] = None) -> tuple:
    """(train, valid or None) megatron-core datasets of at least num_train / num_valid samples."""
    prefixes, weights = parse_data_path(data_path)
    valid_ok = num_valid > 0
    docs = []
    for prefix in prefixes:
        info = check_indexed_dataset(prefix)
        check_tokenizer_matches(prefix, tokenizer)
        ranges = split_document_ranges(info["documents"], split)
        if ranges[0] is None or ranges[0][0] >= ranges[0][1]:
            raise DataError(f"{prefix}: the train part of --split {split} holds none of its {info['documents']} "
                            "documents; give train a larger share or use more data")
        if ranges[1] is None or ranges[1][0] >= ranges[1][1]:
            if ranges[1] is not None and num_valid > 0:
                log.warning(f"{prefix}: the valid part of --split {split} holds none of its "
                            f"{info['documents']} documents; validation is off")
            valid_ok = False
        docs.append(info)
    if len(prefixes) == 1:
        weights = None
    elif weights is None:  # blend in proportion to size, and let megatron-core repeat epochs as needed
        weights = [float(info["tokens"]) for info in docs]
    cache = _cache_dir(prefixes, cache_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=(list(prefixes), weights), split=split,
            path_to_cache=cache, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False)
        matrix = config.split_matrix
        config.split_matrix = [matrix[0], matrix[1] if valid_ok else None, None]  # the test split is held out
        try:
            train, valid, _ = _Builder(GPTDataset, [num_train, num_valid if valid_ok else 0, 0],
                                      lambda: True, config).build()
        except FileNotFoundError as e:
            raise DataError(f"the dataset index cache {cache} written by rank 0 is not readable here ({e}); "
                            "put the data on a filesystem every rank shares") from None
        except IndexError as e:
            raise DataError(f"--data-path blend {list(data_path)}: {e}") from None
    if len(train) < num_train:
        raise DataError(f"the train dataset has {len(train)} samples, fewer than the {num_train} asked for")
    return train, valid


MOCK_EOD = 3


class RandomTokenDataset:
    """data.mock: samples of seq_length + 1 uniformly random tokens, a fixed function of (seed, split, index)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split_index: int = 0):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed, self.split_index = seed, split_index

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, self.split_index, int(idx)])
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64))
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_length)}


class MicroBatchSampler:
    """Sample indices of one DP rank's micro-batches, in Megatron's order, from `consumed` on."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.gbs, self.rank, self.dp = micro_batch_size, global_batch_size, dp_rank, dp_size

    def __iter__(self):
        per_micro = self.mbs * self.dp
        start = self.consumed
        while start + self.gbs <= self.total:
            for j in range(self.gbs // per_micro):
                first = start + j * per_micro + self.rank * self.mbs
                yield list(range(first, first + self.mbs))
            start += self.gbs

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.gbs) * (self.gbs // (self.mbs * self.dp))


def collate(samples: list, documents: Optional[dict] = None) -> dict:
    """Stack samples into a micro-batch: tokens, labels (int64) and loss_mask (float32), each (mbs, L); with
    `documents` (add_document_fields' arguments), the packed-document fields the data flags ask for."""
    batch = {"tokens": torch.stack([s["tokens"] for s in samples]).long(),
             "labels": torch.stack([s["labels"] for s in samples]).long(),
             "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float()}
    return add_document_fields(batch, **documents) if documents else batch


def _ignore_sigterm(worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_data_iterators(cfg, dp_rank: int, dp_size: int, consumed_train_samples: int = 0,
                         vocab_size: Optional[int] = None, cache_path: Optional[str] = None,
                         pin_memory: bool = False) -> tuple:
    """(train_iter, valid_batches) for this DP rank. train_iter yields micro-batches from
    consumed_train_samples on; valid_batches() returns this rank's validation micro-batches (eval_iters
    global batches), or is None when there is no validation data. pin_memory: for the copies to a GPU."""
    d, t = cfg.data, cfg.training
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    if not 0 <= dp_rank < dp_size or gbs % (mbs * dp_size):
        raise DataError(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size {mbs} x data-parallel "
                        f"size {dp_size} (dp_rank {dp_rank})")
    num_train = t.train_iters * gbs
    num_valid = t.eval_iters * gbs if t.eval_iters > 0 and t.eval_interval > 0 else 0
    if not 0 <= consumed_train_samples <= num_train:
        raise DataError(f"resuming at {consumed_train_samples} consumed samples, beyond the {num_train} of "
                        f"--train-iters {t.train_iters} x --global-batch-size {gbs}; raise --train-iters")
    if d.mock:
        if not vocab_size:
            raise DataError("data.mock needs the model's vocab size (model.vocab_size)")
        train = RandomTokenDataset(num_train, d.seq_length, vocab_size, t.seed, 0)
        valid = RandomTokenDataset(num_valid, d.seq_length, vocab_size, t.seed, 1) if num_valid else None
    else:
        tokenizer = load_tokenizer(d.tokenizer_model)
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise DataError(f"--tokenizer-model {d.tokenizer_model} has {tokenizer.vocab_size} pieces, more than "
                            f"the model's vocab size {vocab_size}; raise model.vocab_size or leave it unset")
        train, valid = build_gpt_datasets(d.data_path, d.split, d.seq_length, t.seed, tokenizer, num_train,
                                          num_valid, cache_path or getattr(d, "cache_path", None))
    sampler = MicroBatchSampler(num_train, consumed_train_samples, mbs, gbs, dp_rank, dp_size)
    documents = None
    if d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss:
        # mock data numbers EOD 3, as megamoe's tokenizers do (tools/train_tokenizer.py)
        documents = dict(eod=tokenizer.eod if not d.mock else MOCK_EOD, reset_position_ids=d.reset_position_ids,
                         reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss)
    batch_of = functools.partial(collate, documents=documents)
    # With --exit-signal-handler the main process stops the run on SIGTERM; Slurm sends it to every process of
    # the job, and a worker that died of it would fail the run (DataLoader's SIGCHLD check) before the save.
    ignore_sigterm = t.exit_signal_handler and d.num_workers > 0
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=batch_of,
                                         num_workers=d.num_workers, pin_memory=pin_memory,
                                         worker_init_fn=_ignore_sigterm if ignore_sigterm else None)
    log.info(f"data: {num_train} train samples of {d.seq_length + 1} tokens"
             + (f", {num_valid} valid samples" if valid is not None else ", no validation")
             + (" (mock random tokens)" if d.mock else f" from {' '.join(map(str, d.data_path))}")
             + (f", resuming at sample {consumed_train_samples}" if consumed_train_samples else ""))
    if valid is None:
        return iter(loader), None

    def valid_batches() -> list:
        return [batch_of([valid[i] for i in idx])
                for idx in MicroBatchSampler(num_valid, 0, mbs, gbs, dp_rank, dp_size)]

    return iter(loader), valid_batches

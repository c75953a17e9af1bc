"""Datasets for training: split, blend, Megatron's DP sample order, resume, mock data, and clear errors
for corrupt files and mismatched tokenizers."""
import json
import os
import shutil
import struct

import pytest
import torch

from megamoe.config import Config
from megamoe.data import (
    DataError,
    build_data_iterators,
    build_gpt_datasets,
    check_indexed_dataset,
    load_tokenizer,
    preprocess,
    train_tokenizer,
    write_default_corpus,
)
from megamoe.data.datasets import split_document_ranges
from megamoe.testing import run_on_ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two preprocessed datasets (a: 1/3 of the documents, b: 2/3) and their tokenizer."""
    folder = tmp_path_factory.mktemp("data")
    write_default_corpus(str(folder / "stdlib.jsonl"), max_bytes=250_000)
    docs = []
    for line in open(folder / "stdlib.jsonl", encoding="utf-8"):
        lines = json.loads(line)["text"].splitlines(keepends=True)
        docs += ["".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    docs = [d for d in docs if d.strip()]
    tokenizer = train_tokenizer([str(folder / "stdlib.jsonl")], str(folder / "tok"), 600)
    prefixes = {}
    for name, part in (("a", docs[: len(docs) // 3]), ("b", docs[len(docs) // 3:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        prefixes[name] = preprocess([str(folder / f"{name}.jsonl")], tokenizer, str(folder / name),
                                    append_eod=True, progress=False)["outputs"]["text"]
    return dict(folder=folder, tokenizer=tokenizer, **prefixes)


def make_cfg(data, **over):
    cfg = Config()
    cfg.data.data_path = over.pop("data_path", [data["b"]])
    cfg.data.tokenizer_model = data["tokenizer"]
    cfg.data.seq_length = 32
    cfg.training.train_iters = 6
    cfg.training.micro_batch_size = 2
    cfg.training.global_batch_size = 8
    cfg.training.eval_iters = 2
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "labels", "loss_mask"))


def test_micro_batches_are_shifted_samples_of_the_data(data):
    train_iter, valid_batches = build_data_iterators(make_cfg(data), 0, 1)
    batch = next(train_iter)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, 32)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])  # samples of seq_length + 1 tokens
    assert batch["loss_mask"].eq(1).all()
    tok = load_tokenizer(data["tokenizer"])
    assert 0 <= int(batch["tokens"].min()) and int(batch["tokens"].max()) < tok.vocab_size
    everything = torch.cat([b["tokens"] for b in take(train_iter, 20)])
    assert (everything == tok.eod).any()  # documents end in EOD and samples cross document boundaries


def test_split_keeps_train_and_valid_documents_apart(data):
    assert split_document_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges(10, "100,0,0")[1] is None
    tok = load_tokenizer(data["tokenizer"])
    n = check_indexed_dataset(data["b"])["documents"]
    train, valid = build_gpt_datasets([data["b"]], "80,20,0", 32, 1234, tok, 48, 16)
    (t0, t1), (v0, v1), _ = split_document_ranges(n, "80,20,0")
    assert set(train.document_index) == set(range(t0, t1)) and set(valid.document_index) == set(range(v0, v1))
    assert len(train) >= 48 and len(valid) >= 16
    _, none = build_data_iterators(make_cfg(data, data__split="100,0,0"), 0, 1)
    assert none is None


def test_blend_follows_the_weights(data):
    tok = load_tokenizer(data["tokenizer"])
    train, _ = build_gpt_datasets(["0.75", data["a"], "0.25", data["b"]], "949,50,1", 32, 1234, tok, 400, 8)
    share = (train.dataset_index[:400] == 0).mean()
    assert abs(share - 0.75) < 0.01
    # no weights: blended in proportion to the datasets' token counts
    train, _ = build_gpt_datasets([data["a"], data["b"]], "949,50,1", 32, 1234, tok, 400, 8)
    tokens = [check_indexed_dataset(data[k])["tokens"] for k in "ab"]
    assert abs((train.dataset_index[:400] == 0).mean() - tokens[0] / sum(tokens)) < 0.01
    cfg = make_cfg(data, data_path=["0.75", data["a"], "0.25", data["b"]])
    assert next(build_data_iterators(cfg, 0, 1)[0])["tokens"].shape == (2, 32)


def test_resume_yields_exactly_the_uninterrupted_samples(data):
    cfg = make_cfg(data)
    full = take(build_data_iterators(cfg, 0, 1)[0], 6 * 4)  # 6 steps of 4 micro-batches
    resumed = take(build_data_iterators(cfg, 0, 1, consumed_train_samples=3 * 8)[0], 3 * 4)
    assert same(resumed, full[12:])
    assert not same(full[:4], full[4:8])


def test_loader_workers_yield_the_same_batches_in_the_same_order(data):
    cfg = make_cfg(data)
    serial = take(build_data_iterators(cfg, 0, 1, consumed_train_samples=8)[0], 5 * 4)
    cfg.data.num_workers = 2
    parallel = take(build_data_iterators(cfg, 0, 1, consumed_train_samples=8)[0], 5 * 4)
    assert same(parallel, serial)


def test_data_parallel_ranks_split_each_global_batch_in_megatron_order(data):
    cfg = make_cfg(data)
    single = take(build_data_iterators(cfg, 0, 1)[0], 2 * 4)  # micro-batches 0..3 of steps 0 and 1
    ranks = [take(build_data_iterators(cfg, r, 2)[0], 2 * 2) for r in (0, 1)]
    for j in range(4):  # DP=2: rank r's micro-batch j is the single process's micro-batch 2j + r
        assert same([ranks[0][j], ranks[1][j]], single[2 * j: 2 * j + 2])
    resumed = take(build_data_iterators(cfg, 1, 2, consumed_train_samples=8)[0], 2)
    assert same(resumed, [single[5], single[7]])


def test_validation_batches_are_fixed_and_cover_the_same_samples_for_any_dp(data):
    cfg = make_cfg(data)
    valid = build_data_iterators(cfg, 0, 1)[1]
    first, second = valid(), valid()
    assert len(first) == 2 * 4 and same(first, second)  # eval_iters global batches of 4 micro-batches
    halves = [build_data_iterators(cfg, r, 2)[1]() for r in (0, 1)]
    assert len(halves[0]) == 4
    interleaved = [halves[j % 2][j // 2] for j in range(8)]
    assert same(interleaved, first)


def test_mock_data_needs_no_files(data):
    cfg = make_cfg(data, data__mock=True, data__data_path=[], data__tokenizer_model=None)
    a = take(build_data_iterators(cfg, 0, 1, vocab_size=50)[0], 8)
    b = take(build_data_iterators(cfg, 0, 1, vocab_size=50, consumed_train_samples=8)[0], 4)
    assert same(b, a[4:]) and int(a[0]["tokens"].max()) < 50
    assert torch.equal(a[0]["labels"][:, :-1], a[0]["tokens"][:, 1:])
    assert len(build_data_iterators(cfg, 0, 1, vocab_size=50)[1]()) == 8
    with pytest.raises(DataError, match="vocab size"):
        build_data_iterators(cfg, 0, 1)


def damaged_copy(data, tmp_path, name, damage):
    prefix = str(tmp_path / name)
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(data["b"] + ext, prefix + ext)
    damage(prefix)
    return prefix


def patch(path, offset, payload):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)


def truncate(path, nbytes):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - nbytes)


DAMAGE = {
    "bin_truncated": (lambda p: truncate(p + ".bin", 2), r"\.bin is truncated"),
    "bin_too_long": (lambda p: open(p + ".bin", "ab").write(b"\0\0"), r"\.bin is longer than its index"),
    "idx_truncated": (lambda p: truncate(p + ".idx", 8), r"\.idx is truncated"),
    "idx_header_only": (lambda p: truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), r"shorter than the 34-byte"),
    "bad_magic": (lambda p: patch(p + ".idx", 0, b"NOTANIDX\0"), r"not a Megatron indexed-dataset index"),
    "bad_version": (lambda p: patch(p + ".idx", 9, struct.pack("<Q", 2)), r"index version 2"),
    "bad_dtype": (lambda p: patch(p + ".idx", 17, struct.pack("<B", 99)), r"unknown token dtype code 99"),
    "wrong_dtype": (lambda p: patch(p + ".idx", 17, struct.pack("<B", 4)), r"\.bin is truncated"),
    "no_bin": (lambda p: os.remove(p + ".bin"), r"\.bin does not exist"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_files_give_clear_errors(data, tmp_path, name):
    damage, message = DAMAGE[name]
    prefix = damaged_copy(data, tmp_path, name, damage)
    with pytest.raises(DataError, match=message):
        check_indexed_dataset(prefix)
    with pytest.raises(DataError, match=message):
        build_data_iterators(make_cfg(data, data_path=[prefix]), 0, 1)


def test_tokenizer_mismatch_is_caught(data, tmp_path):
    other = train_tokenizer([str(data["folder"] / "a.jsonl")], str(tmp_path / "other"), 500)
    cfg = make_cfg(data, data__tokenizer_model=other)
    with pytest.raises(DataError, match="different one"):
        build_data_iterators(cfg, 0, 1)
    # without the sidecar (data made elsewhere): token ids beyond the tokenizer's vocabulary
    prefix = damaged_copy(data, tmp_path, "nosidecar", lambda p: os.remove(p + ".json"))
    with pytest.raises(DataError, match="has only 500 pieces"):
        build_data_iterators(make_cfg(data, data_path=[prefix], data__tokenizer_model=other), 0, 1)
    assert next(build_data_iterators(make_cfg(data, data_path=[prefix]), 0, 1)[0])["tokens"].shape == (2, 32)
    with pytest.raises(DataError, match="more than the model's vocab size 512"):
        build_data_iterators(make_cfg(data), 0, 1, vocab_size=512)
    with pytest.raises(DataError, match="does not exist"):
        build_data_iterators(make_cfg(data, data__tokenizer_model=str(tmp_path / "none.model")), 0, 1)


def _build_under_torch_distributed(cfg_dict, cache):
    """Every rank builds (rank 0 writes the index cache first, the other reads it) and returns its batches."""
    import torch.distributed as dist

    from megamoe.config import config_from_dict
    dist.init_process_group("gloo")
    try:
        cfg = config_from_dict(cfg_dict)
        train_iter, valid = build_data_iterators(cfg, dist.get_rank(), 2, cache_path=cache)
        as_lists = lambda batches: [{k: v.tolist() for k, v in b.items()} for b in batches]  # noqa: E731
        return as_lists(take(train_iter, 4)), as_lists(valid())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_under_torch_distributed_share_the_index_cache(data, tmp_path):
    cfg = make_cfg(data, data_path=["0.4", data["a"], "0.6", data["b"]])
    single = take(build_data_iterators(cfg, 0, 1, cache_path=str(tmp_path / "c1"))[0], 8)
    results = run_on_ranks(_build_under_torch_distributed, 2, args=(cfg.to_dict(), str(tmp_path / "c2")))
    for j in range(4):  # rank r's micro-batch j is the single process's micro-batch 2j + r
        for r in (0, 1):
            assert results[r][0][j]["tokens"] == single[2 * j + r]["tokens"].tolist()
            assert results[r][0][j]["labels"] == single[2 * j + r]["labels"].tolist()
    assert len(results[0][1]) == len(results[1][1]) == 4
    assert len(os.listdir(tmp_path / "c2")) > 0

"""The preprocessing pipeline against references: the bytes of megatron-core's own builder fed one document at a
time, the standard library's JSON decoder, Parquet files and saved Hugging Face datasets (read like JSONL, with
the same bad-record handling), and a Hugging Face tokenizer."""
import json
import os

import numpy as np
import pytest
import torch

from megamoe.data import DataError, load_tokenizer, preprocess, read_sidecar
from megamoe.data import records as records_module
from megamoe.data.indexed import IndexedWriter, concatenate, indexed_dataset, optimal_dtype
from tests.data import test_preprocess
from tests.data.test_preprocess import BAD_LINES, read_back

corpus, tokenizer = test_preprocess.corpus, test_preprocess.tokenizer  # the same fixtures: ~300 small documents


def reference_files(path, tokenizer_model, prefix, keys=("text",), append_eod=True):
    """What the pipeline replaced: json.loads and one encode per document into megatron-core's
    IndexedDatasetBuilder, one builder per key."""
    tok = load_tokenizer(tokenizer_model)
    builders = {k: indexed_dataset.IndexedDatasetBuilder(f"{prefix}_{k}.bin", dtype=optimal_dtype(tok.vocab_size))
                for k in keys}
    for line in open(path, "rb"):
        record = json.loads(line)
        for k in keys:
            ids = tok.encode(record[k]) + ([tok.eod] if append_eod else [])
            builders[k].add_document(ids, [len(ids)])
    for k in keys:
        builders[k].finalize(f"{prefix}_{k}.idx")
    return {k: [open(f"{prefix}_{k}{e}", "rb").read() for e in (".bin", ".idx")] for k in keys}


def output_bytes(prefix, keys=("text",)):
    return {k: [open(f"{prefix}_{k}_document{e}", "rb").read() for e in (".bin", ".idx")] for k in keys}


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 1), (2, 3)])
def test_bytes_equal_megatron_core_builder_fed_one_document_at_a_time(corpus, tokenizer, tmp_path, workers,
                                                                      partitions):
    path, docs = corpus
    keys = ("text", "title")
    expected = reference_files(path, tokenizer, str(tmp_path / "ref"), keys)
    stats = preprocess([path], tokenizer, str(tmp_path / "new"), json_keys=keys, append_eod=True, workers=workers,
                       partitions=partitions, progress=False)
    assert stats["documents"] == len(docs) and stats["bytes"] == os.path.getsize(path)
    assert output_bytes(str(tmp_path / "new"), keys) == expected


def test_writer_concatenates_multi_sequence_documents_as_megatron_core_does(tmp_path):
    """add_index of datasets whose documents hold several sequences (e.g. sentence-split data)."""
    rng = np.random.default_rng(0)
    parts = []
    for p in range(3):
        builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / f"p{p}.bin"), dtype=np.uint16)
        for _ in range(5 + p):
            for _ in range(int(rng.integers(1, 4))):
                builder.add_item(torch.from_numpy(rng.integers(0, 900, int(rng.integers(0, 9)))))
            builder.end_document()
        builder.finalize(str(tmp_path / f"p{p}.idx"))
        parts.append(str(tmp_path / f"p{p}"))
    ref = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in parts:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    concatenate(parts, str(tmp_path / "ours"), np.uint16)
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"ours{ext}", "rb").read() == open(tmp_path / f"ref{ext}", "rb").read()
    writer = IndexedWriter(str(tmp_path / "w.bin"), np.uint16)  # and documents added as arrays, then an index
    writer.add_documents(np.arange(10, dtype=np.uint16), np.array([3, 0, 7]))
    writer.add_index(parts[0])
    writer.finalize(str(tmp_path / "w.idx"))
    ref = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "r.bin"), dtype=np.uint16)
    for start, n in ((0, 3), (3, 0), (3, 7)):
        ref.add_document(np.arange(start, start + n), [n])
    ref.add_index(parts[0])
    ref.finalize(str(tmp_path / "r.idx"))
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"w{ext}", "rb").read() == open(tmp_path / f"r{ext}", "rb").read()


def test_standard_library_json_gives_the_same_files_and_verdicts(corpus, tokenizer, tmp_path, monkeypatch):
    path, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES + [b'{"text": 1e999, "x": NaN}', b'{"text": "big", "n": 1' + b"0" * 30
                                            + b'}', b'\xef\xbb\xbf{"text": "bom"}']) + b"\n")
    runs = []
    for decoder in (records_module.orjson, None):
        monkeypatch.setattr(records_module, "orjson", decoder)
        stats = [preprocess([p], tokenizer, str(tmp_path / f"{name}{decoder is None}"), append_eod=True,
                            progress=False) for name, p in (("c", path), ("b", str(bad)))]
        runs.append(([{k: s[k] for k in ("documents", "tokens", "skipped", "examples", "bytes")} for s in stats],
                     output_bytes(str(tmp_path / f"c{decoder is None}")),
                     output_bytes(str(tmp_path / f"b{decoder is None}"))))
    assert runs[0][0][1]["documents"] == 3  # the good lines, and the one with a 31-digit number
    assert runs[0][0][1]["skipped"] == {"malformed_json": 3, "missing_key": 1, "not_utf8": 2, "empty": 1,
                                        "not_a_string": 2}
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def table_docs(corpus):
    """Documents as rows: good ones, and the bad kinds a column can hold."""
    _, docs = corpus
    good = docs[:40]
    rows = [{"text": d, "title": f"document {i}"} for i, d in enumerate(good)]
    rows[5]["text"] = None  # not_a_string
    rows[9]["text"] = "   "  # empty
    return good, rows


def _expected(tokenizer_model, rows):
    tok = load_tokenizer(tokenizer_model)
    return [tok.encode(r["text"]) + [tok.eod] for r in rows if r["text"] and r["text"].strip()]


def test_parquet_files_read_like_jsonl(table_docs, tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, rows = table_docs
    table = pa.Table.from_pylist(rows)
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(table.slice(0, 25), folder / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(25), folder / "b.parquet")
    raw = pa.table({"text": pa.array([b"ok bytes\n", b"caf\xe9"], pa.binary())})
    pq.write_table(raw, folder / "c.parquet")
    tok = load_tokenizer(tokenizer)
    want = _expected(tokenizer, rows) + [tok.encode("ok bytes\n") + [tok.eod]]
    for workers, partitions in ((1, 1), (2, 1), (2, 2)):
        stats = preprocess([str(folder)], tokenizer, str(tmp_path / "out" / f"w{workers}p{partitions}"),
                           append_eod=True, workers=workers, partitions=partitions, progress=False)
        assert read_back(stats["outputs"]["text"])[0] == want
        assert stats["skipped"] == {"not_a_string": 1, "empty": 1, "not_utf8": 1}
        assert stats["examples"] == [f"{folder}/a.parquet:row 5: not_a_string: 'text' is a NoneType, not a string",
                                     f"{folder}/a.parquet:row 9: empty: 'text' is empty",
                                     f"{folder}/c.parquet:row 1: not_utf8: invalid UTF-8 byte 0xe9 at byte 3"]
    with pytest.raises(DataError, match=r"a.parquet:row 5: not_a_string.*without --strict"):
        preprocess([str(folder / "a.parquet")], tokenizer, str(tmp_path / "s"), strict=True, progress=False)
    with pytest.raises(DataError, match=r"all 25 records were bad \(missing_key 25\).*no key 'body'"):
        preprocess([str(folder / "a.parquet")], tokenizer, str(tmp_path / "k"), json_keys=["body"], progress=False)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet is not a readable Parquet file"):
        preprocess([str(tmp_path / "junk.parquet")], tokenizer, str(tmp_path / "j"), progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("s_", "k_", "j_"))]


def test_saved_hugging_face_datasets_read_in_their_order(table_docs, tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, rows = table_docs
    ds = datasets.Dataset.from_list(rows).shuffle(seed=1).select(range(30))  # an indices mapping, flattened on save
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert len([f for f in os.listdir(tmp_path / "ds") if f.endswith(".arrow")]) > 1
    order = list(ds)
    stats = preprocess([str(tmp_path / "ds")], tokenizer, str(tmp_path / "o"), json_keys=["text", "title"],
                       append_eod=True, workers=2, progress=False)
    assert read_back(stats["outputs"]["text"])[0] == _expected(tokenizer, order)
    tok = load_tokenizer(tokenizer)
    assert read_back(stats["outputs"]["title"])[0] == [tok.encode(r["title"]) + [tok.eod] for r in order
                                                       if r["text"] and r["text"].strip()]
    bad = [i for i, r in enumerate(order) if not (r["text"] and r["text"].strip())]
    assert [e.split(": ")[0] for e in stats["examples"]] == [f"{tmp_path}/ds:row {i}" for i in bad]
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="is a saved DatasetDict.*splits: test, train.*dd/test"):
        preprocess([str(tmp_path / "dd")], tokenizer, str(tmp_path / "x"), progress=False)
    stats = preprocess([str(tmp_path / "dd" / "test")], tokenizer, str(tmp_path / "t"), progress=False)
    assert stats["documents"] == sum(1 for r in order[:3] if r["text"] and r["text"].strip())


def test_a_hugging_face_tokenizer_through_preprocessing(corpus, tmp_path):
    from tests.conftest import train_hf_tokenizer
    path, docs = corpus
    folder = train_hf_tokenizer(path, str(tmp_path / "hf"), 700)
    tok = load_tokenizer(folder)
    runs = []
    for workers, partitions in ((1, 1), (2, 1), (2, 2)):
        stats = preprocess([path], folder, str(tmp_path / f"w{workers}p{partitions}"), append_eod=True,
                           workers=workers, partitions=partitions, progress=False,
                           tokenizer_type="HuggingFaceTokenizer")
        runs.append(output_bytes(str(tmp_path / f"w{workers}p{partitions}")))
    assert runs[0] == runs[1] == runs[2]
    prefix = stats["outputs"]["text"]
    got, ds = read_back(prefix)
    assert got == [tok.encode(d) + [tok.eod] for d in docs] and ds.index.dtype == np.uint16
    side = read_sidecar(prefix)["tokenizer"]
    assert side["type"] == "HuggingFaceTokenizer" and side["fingerprint"] == tok.fingerprint
    assert side["model"] == os.path.abspath(folder) and side["eod"] == tok.eod

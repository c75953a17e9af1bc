"""Preprocessing to Megatron .bin/.idx: round trip through megatron-core, workers and partitions,
bad input, --strict, atomic output, and the command-line tools run as subprocesses."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megamoe.data import (
    DataError,
    check_indexed_dataset,
    load_tokenizer,
    merge_datasets,
    preprocess,
    read_sidecar,
    train_tokenizer,
    write_default_corpus,
)
from megamoe.data.indexed import indexed_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 300 small documents: the default corpus cut into chunks of lines."""
    folder = tmp_path_factory.mktemp("corpus")
    write_default_corpus(str(folder / "stdlib.jsonl"), max_bytes=300_000)
    docs = []
    for line in open(folder / "stdlib.jsonl", encoding="utf-8"):
        lines = json.loads(line)["text"].splitlines(keepends=True)
        docs += ["".join(lines[i:i + 10]) for i in range(0, len(lines), 10)]
    docs = [d for d in docs if d.strip()]
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "title": d.strip().splitlines()[0]}) + "\n" for d in docs),
                    encoding="utf-8")
    return str(path), docs


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer([corpus[0]], str(tmp_path_factory.mktemp("tok") / "tok"), 700)


def read_back(prefix):
    ds = indexed_dataset.IndexedDataset(prefix)
    return [list(map(int, ds[i])) for i in range(len(ds))], ds


def test_round_trip_through_megatron_indexed_dataset(corpus, tokenizer, tmp_path):
    path, docs = corpus
    stats = preprocess([path], tokenizer, str(tmp_path / "out" / "c"), append_eod=True, progress=False)
    tok = load_tokenizer(tokenizer)
    prefix = str(tmp_path / "out" / "c_text_document")
    assert stats["outputs"] == {"text": prefix} and stats["documents"] == len(docs) > 200
    got, ds = read_back(prefix)
    assert got == [tok.encode(d) + [tok.eod] for d in docs]
    assert ds.index.dtype == np.uint16 and stats["tokens"] == sum(map(len, got))
    assert check_indexed_dataset(prefix) == dict(documents=len(docs), sequences=len(docs), tokens=stats["tokens"],
                                                 dtype="uint16")
    side = read_sidecar(prefix)
    assert side["tokenizer"]["fingerprint"] == tok.fingerprint and side["tokenizer"]["vocab_size"] == 700
    assert side["documents"] == len(docs) and side["append_eod"] is True
    assert sorted(os.listdir(tmp_path / "out")) == [f"c_text_document.{e}" for e in ("bin", "idx", "json")]


def test_workers_and_partitions_write_identical_files(corpus, tokenizer, tmp_path):
    path, _ = corpus
    runs = {}
    for workers, partitions in ((1, 1), (2, 1), (2, 3)):
        prefix = str(tmp_path / f"w{workers}p{partitions}")
        stats = preprocess([path], tokenizer, prefix, append_eod=True, workers=workers, partitions=partitions,
                           progress=False)
        assert stats["partitions"] == partitions
        runs[workers, partitions] = [open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx")]
    assert runs[1, 1] == runs[2, 1] == runs[2, 3]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p or "part" in p]


def test_several_json_keys_and_no_eod(corpus, tokenizer, tmp_path):
    path, docs = corpus
    stats = preprocess([path], tokenizer, str(tmp_path / "k"), json_keys=("text", "title"), progress=False)
    tok = load_tokenizer(tokenizer)
    text, _ = read_back(stats["outputs"]["text"])
    title, _ = read_back(stats["outputs"]["title"])
    assert text == [tok.encode(d) for d in docs]
    assert title == [tok.encode(d.strip().splitlines()[0]) for d in docs]


BAD_LINES = [
    b'{"text": "def good_one():\\n    return 1\\n"}',
    b'{"text": "unterminated',  # line 2: malformed_json
    b'{"body": "no text key"}',  # line 3: missing_key
    b'{"text": "caf\xe9 in latin-1"}',  # line 4: not_utf8
    b'{"text": "   "}',  # line 5: empty
    b'',  # line 6: a blank line is not a record
    b'{"text": 42}',  # line 7: not_a_string
    b'{"text": "lone surrogate \\ud800"}',  # line 8: not_utf8 (valid JSON, not encodable)
    b'["a", "list"]',  # line 9: malformed_json (not an object)
    b'{"text": "class Good:\\n    pass\\n"}',
]


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    return str(path)


@pytest.mark.parametrize("partitions", [1, 3])
def test_bad_records_are_counted_reported_and_skipped(bad_file, tokenizer, tmp_path, partitions):
    stats = preprocess([bad_file], tokenizer, str(tmp_path / "o"), partitions=partitions, workers=2, progress=False)
    assert stats["documents"] == 2
    assert stats["skipped"] == {"malformed_json": 2, "missing_key": 1, "not_utf8": 2, "empty": 1, "not_a_string": 1}
    assert stats["examples"][0].startswith(f"{bad_file}:2: malformed_json")
    assert [e.split(": ")[0] for e in stats["examples"]] == [f"{bad_file}:{n}" for n in (2, 3, 4, 5, 7)]
    tok = load_tokenizer(tokenizer)
    got, _ = read_back(stats["outputs"]["text"])
    assert got == [tok.encode("def good_one():\n    return 1\n"), tok.encode("class Good:\n    pass\n")]


@pytest.mark.parametrize("partitions", [1, 3])
def test_strict_stops_at_the_first_bad_record_and_leaves_no_files(bad_file, tokenizer, tmp_path, partitions):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{bad_file}:2: malformed_json.*without --strict"):
        preprocess([bad_file], tokenizer, str(out / "o"), strict=True, partitions=partitions, workers=2,
                   progress=False)
    assert os.listdir(out) == []


def test_a_failed_run_keeps_the_previous_output(corpus, bad_file, tokenizer, tmp_path):
    prefix = str(tmp_path / "o")
    preprocess([corpus[0]], tokenizer, prefix, progress=False)
    before = {e: open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx", ".json")}
    with pytest.raises(DataError):
        preprocess([bad_file], tokenizer, prefix, strict=True, progress=False)
    assert before == {e: open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx", ".json")}
    assert sorted(os.listdir(tmp_path)) == ["in"] + [f"o_text_document{e}" for e in (".bin", ".idx", ".json")]


def test_only_bad_records_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b'{"x": 1}\n{oops\n')
    with pytest.raises(DataError, match="all 2 records were bad"):
        preprocess([str(path)], tokenizer, str(tmp_path / "o"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["all_bad.jsonl"]


def test_text_files_folders_globs_and_gzip(tokenizer, tmp_path):
    docs = ["import os\n\nprint(os.sep)\n", "x = [1, 2, 3]\n", "def g():\n    yield 1\n"]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text(docs[0])
    with gzip.open(tmp_path / "in" / "sub" / "b.txt.gz", "wt") as f:
        f.write(docs[1])
    (tmp_path / "in" / "sub" / "c.py").write_text(docs[2])
    (tmp_path / "in" / "sub" / "empty.txt").write_text("")
    tok = load_tokenizer(tokenizer)
    stats = preprocess([str(tmp_path / "in")], tokenizer, str(tmp_path / "f"), append_eod=True, progress=False)
    assert read_back(stats["outputs"]["text"])[0] == [tok.encode(d) + [tok.eod] for d in docs]
    assert stats["skipped"] == {"empty": 1}
    sharded = preprocess([str(tmp_path / "in")], tokenizer, str(tmp_path / "s"), append_eod=True, workers=2,
                         partitions=3, progress=False)
    assert sharded["partitions"] > 1 and sharded["skipped"] == {"empty": 1}
    assert read_back(sharded["outputs"]["text"])[0] == read_back(stats["outputs"]["text"])[0]
    stats = preprocess([str(tmp_path / "in" / "**" / "*.gz")], tokenizer, str(tmp_path / "g"), progress=False)
    assert read_back(stats["outputs"]["text"])[0] == [tok.encode(docs[1])]
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\nsecond line\n")
    stats = preprocess([str(lines)], tokenizer, str(tmp_path / "l"), text_mode="line", progress=False)
    assert read_back(stats["outputs"]["text"])[0] == [tok.encode("first line"), tok.encode("second line")]


def test_input_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        preprocess([str(tmp_path / "missing.jsonl")], tokenizer, str(tmp_path / "o"))
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="only the 'text' key"):
        preprocess([str(tmp_path / "a.txt")], tokenizer, str(tmp_path / "o"), json_keys=("title",))
    with pytest.raises(DataError, match="does not exist"):
        preprocess([str(tmp_path / "a.txt")], str(tmp_path / "nope.model"), str(tmp_path / "o"))


def test_merge_concatenates_in_order(corpus, tokenizer, tmp_path):
    path, docs = corpus
    half = len(docs) // 2
    for name, part in (("a", docs[:half]), ("b", docs[half:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        preprocess([str(tmp_path / f"{name}.jsonl")], tokenizer, str(tmp_path / name), progress=False)
    whole = preprocess([path], tokenizer, str(tmp_path / "whole"), progress=False)["outputs"]["text"]
    merged = str(tmp_path / "merged_text_document")
    merge_datasets([str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")], merged)
    assert read_back(merged)[0] == read_back(whole)[0]
    assert read_sidecar(merged)["documents"] == len(docs)


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_line_tools(tmp_path):
    corpus, prefix = str(tmp_path / "c.jsonl"), str(tmp_path / "data" / "c")
    r = run_tool("tools/make_default_corpus.py", "--output", corpus, "--max-bytes", "200K")
    assert r.returncode == 0 and "documents" in r.stdout, r.stderr
    r = run_tool("tools/train_tokenizer.py", "--input", corpus, "--model-prefix", str(tmp_path / "tok"),
                 "--vocab-size", "500")
    assert r.returncode == 0 and os.path.isfile(tmp_path / "tok.model"), r.stderr
    r = run_tool("tools/preprocess_data.py", "--input", corpus, "--tokenizer-model", str(tmp_path / "tok.model"),
                 "--output-prefix", prefix, "--append-eod", "--workers", "2", "--partitions", "2")
    assert r.returncode == 0 and f"--data-path {prefix}_text_document" in r.stdout, r.stderr
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tok = load_tokenizer(str(tmp_path / "tok.model"))
    assert read_back(prefix + "_text_document")[0] == [tok.encode(d) + [tok.eod] for d in docs]
    r = run_tool("tools/preprocess_data.py", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer-model",
                 str(tmp_path / "tok.model"), "--output-prefix", prefix)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("preprocess_data: error:") and "missing.jsonl" in r.stderr

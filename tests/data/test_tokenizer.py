"""sentencepiece training from JSONL / text / folders / globs / .gz; the Tokenizer the datasets use, with its two
backends (sentencepiece, Hugging Face tokenizers)."""
import gzip
import json
import pickle

import pytest

from megamoe.data import (
    DataError,
    HuggingFaceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
    write_default_corpus,
)
from megamoe.data.tokenizer import EOS_ID, PAD_ID

CODE = "class A:\n    def f(self, x):\n\t\treturn x  # café, naïve, 東京 🚀\n\n\n        pass\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_default_corpus(str(path), max_bytes=300_000)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_model(corpus, tmp_path_factory):
    return train_tokenizer([corpus], str(tmp_path_factory.mktemp("tok") / "tok"), 800)


def test_trained_bpe_round_trips_code_exactly(tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    assert tok.vocab_size == 800 and tok.eod == EOS_ID and tok.pad == PAD_ID
    ids = tok.encode(CODE)
    assert tok.decode(ids) == CODE  # indentation, tabs, blank lines and non-ASCII survive
    assert tok.eod not in ids and tok.pad not in ids and tok.unk not in ids  # control pieces never from text
    assert max(ids) < tok.vocab_size
    # newline-bearing pieces exist because training chunks keep whole lines
    assert any("\n" in tok.sp.id_to_piece(i) for i in range(tok.vocab_size))
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint
    assert open(tokenizer_model[:-6] + ".vocab", encoding="utf-8").read().count("\n") == 800


def test_tokenizer_pickles(tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    again = pickle.loads(pickle.dumps(tok))
    assert isinstance(again, Tokenizer) and again.encode(CODE) == tok.encode(CODE)
    assert again.fingerprint == tok.fingerprint


def test_unigram_and_sentence_cap(corpus, tmp_path):
    stats = {}
    path = train_tokenizer([corpus], str(tmp_path / "uni"), 600, model_type="unigram", max_sentences=40,
                           stats=stats)
    assert stats["sentences"] == 40
    tok = load_tokenizer(path)
    assert tok.vocab_size == 600 and tok.decode(tok.encode(CODE)) == CODE


def test_text_files_folders_globs_and_gzip(corpus, tmp_path):
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    with gzip.open(folder / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[1])
    with gzip.open(folder / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[2:5]))
    (folder / ".hidden.txt").write_bytes(b"\xff\xfe not text")
    for inputs in ([str(folder)], [str(folder / "**" / "*.gz"), str(folder / "a.txt")]):
        stats = {}
        path = train_tokenizer(inputs, str(tmp_path / "t"), 400, stats=stats)
        assert stats["sentences"] > 10 and stats["skipped"] == {}
        assert load_tokenizer(path).vocab_size == 400


def test_bad_input_is_skipped_and_counted(tmp_path):
    good = "def f(x):\n    return x * 2\n" * 200
    lines = [json.dumps({"text": good}), "{not json", json.dumps({"body": "x"}), json.dumps({"text": ""})]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
    stats = {}
    train_tokenizer([str(path)], str(tmp_path / "t"), 300, stats=stats)
    assert stats["skipped"] == {"malformed_json": 1, "missing_key": 1, "empty": 1, "not_utf8": 1}


def test_errors_name_the_file_and_the_fix(tmp_path, corpus):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_text("this is not a model")
    with pytest.raises(DataError, match="junk.model is not a sentencepiece model"):
        load_tokenizer(str(junk))
    with pytest.raises(DataError, match="lower --vocab-size"):
        train_tokenizer([corpus], str(tmp_path / "big"), 60000, max_sentences=20)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([corpus], str(tmp_path / "small"), 100)
    with pytest.raises(DataError, match="no such file"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], str(tmp_path / "x"), 400)
    assert not (tmp_path / "big.model").exists()


# Hugging Face tokenizers: a byte-level BPE trained here with the `tokenizers` library (GPT-2's kind)
@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
    from tests.conftest import train_hf_tokenizer
    return train_hf_tokenizer(corpus, str(tmp_path_factory.mktemp("hf") / "tok"), 600)


def test_hf_tokenizer_round_trips_pickles_and_names_its_eod(hf_folder, tokenizer_model):
    import tokenizers
    tok = load_tokenizer(hf_folder)  # a folder: told by the path
    assert isinstance(tok, HuggingFaceTokenizer) and tok.type_name == "HuggingFaceTokenizer"
    plain = tokenizers.Tokenizer.from_file(f"{hf_folder}/tokenizer.json")
    assert tok.vocab_size == 600 and tok.eod == plain.token_to_id("<|endoftext|>") == 0 and tok.pad == -1
    ids = tok.encode(CODE)
    assert ids == plain.encode(CODE).ids and tok.decode(ids) == CODE and tok.eod not in ids
    assert tok.encode_batch([CODE, "x = 1\n"]) == [ids, tok.encode("x = 1\n")]
    again = pickle.loads(pickle.dumps(tok))
    assert isinstance(again, Tokenizer) and again.encode(CODE) == ids and again.fingerprint == tok.fingerprint
    for other in (load_tokenizer(f"{hf_folder}/tokenizer.json"), load_tokenizer(hf_folder, "HuggingFaceTokenizer")):
        assert other.fingerprint == tok.fingerprint and other.eod == tok.eod
    assert tok.fingerprint != load_tokenizer(tokenizer_model).fingerprint
    assert tok.unique_identifiers == {"class": "HuggingFaceTokenizer", "fingerprint": tok.fingerprint,
                                      "vocab_size": 600, "eod": 0, "pad": -1}
    assert load_tokenizer(tokenizer_model).unique_identifiers["class"] == "SentencePieceTokenizer"


def test_hf_eod_and_pad_from_the_files_beside_tokenizer_json(hf_folder, tmp_path):
    data = open(f"{hf_folder}/tokenizer.json", "rb").read()
    bare = tmp_path / "bare"  # no config: a usual end-of-text token of the vocabulary
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(data)
    assert load_tokenizer(str(bare)).eod == 0
    by_id = tmp_path / "by_id"  # config.json's eos_token_id (a list, as Llama 3's generation config has)
    by_id.mkdir()
    (by_id / "tokenizer.json").write_bytes(data)
    (by_id / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (by_id / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    tok = load_tokenizer(str(by_id))
    assert tok.eod == 7 and tok.pad == 0
    assert tok.fingerprint != load_tokenizer(str(bare)).fingerprint  # the EOD is part of the encoding
    none = tmp_path / "none"  # no eos anywhere
    none.mkdir()
    (none / "tokenizer.json").write_bytes(data.replace(b"<|endoftext|>", b"<|special|>"))
    with pytest.raises(DataError, match="no end-of-document token.*tokenizer_config.json"):
        load_tokenizer(str(none))


def test_hf_tokenizer_errors(hf_folder, tokenizer_model, tmp_path):
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="is a folder, not a sentencepiece .model"):
        load_tokenizer(hf_folder, "GPTSentencePieceTokenizer")
    with pytest.raises(DataError, match="--tokenizer-type GPT2BPETokenizer: use one of"):
        load_tokenizer(hf_folder, "GPT2BPETokenizer")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer"):
        load_tokenizer(tokenizer_model, "HuggingFaceTokenizer")  # a sentencepiece file named as Hugging Face's

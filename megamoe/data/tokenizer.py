"""Tokenizers: one interface, two backends, and sentencepiece training from a corpus stream.

    Tokenizer                 what everything else uses: encode, encode_batch, decode, vocab_size, eod, pad,
                              fingerprint (identifies the encoding, checked between the data and a run),
                              unique_identifiers (megatron-core's GPTDataset cache key); pickles
    SentencePieceTokenizer    a sentencepiece .model (Megatron's GPTSentencePieceTokenizer, SentencePieceTokenizer,
                              Llama2Tokenizer)
    HuggingFaceTokenizer      a Hugging Face fast tokenizer: a folder with tokenizer.json, as Llama, Qwen or GPT-2
                              ship theirs (Megatron's HuggingFaceTokenizer), read with the `tokenizers` library
    load_tokenizer(path, tokenizer_type=None)   either, by --tokenizer-type or by what the path is

sentencepiece special pieces (control symbols, so no text ever encodes to them), as train_tokenizer sets them:
    0 <pad>  padding (megatron-core's GPTDataset masks the loss where the label is pad)
    1 <unk>
    2 <s>    bos (unused by GPT-style training, kept for compatibility)
    3 </s>   eos, used as the end-of-document token (EOD), as Megatron-LM's GPTSentencePieceTokenizer does
A model trained elsewhere works too: EOD is its eos id, pad its pad id (or -1 when it has none).
A Hugging Face tokenizer's EOD is its eos token (tokenizer_config.json's `eos_token`, as transformers reads it),
pad its pad token or -1; `encode` applies the tokenizer's own post-processor (special tokens it adds, such as
Llama's BOS), as Megatron's HuggingFaceTokenizer does.

Training defaults suit code as well as prose: identity normalization and no whitespace folding, so
decode(encode(text)) == text (indentation included), whitespace-only pieces, digits split, and byte
fallback so any text encodes without <unk>. Documents are cut into chunks of whole lines of about
`chunk_chars` characters, each one sentencepiece "sentence", so newlines are part of the vocabulary.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterator, Optional, Sequence

import sentencepiece as spm

from megamoe.config import tokenizer_backend
from megamoe.data.inputs import resolve_inputs
from megamoe.data.records import iter_texts
from megamoe.errors import ConfigError, DataError

MODEL_TYPES = ("bpe", "unigram", "char", "word")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
HF_FILE = "tokenizer.json"
HF_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")  # when no config file names the eos token


class Tokenizer:
    """The interface of both backends. `encode_batch` encodes in the calling thread (the preprocessing workers
    are the parallelism); `fingerprint` identifies the encoding, not where the files live."""

    type_name = ""  # Megatron's --tokenizer-type
    path: Optional[str] = None
    vocab_size: int
    eod: int
    pad: int
    fingerprint: str

    def encode(self, text: str) -> list:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": self.type_name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "eod": self.eod, "pad": self.pad}

    def describe(self) -> dict:
        """What the data's sidecar records."""
        return dict(type=self.type_name, model=os.path.abspath(self.path) if self.path else None,
                    fingerprint=self.fingerprint, vocab_size=self.vocab_size, eod=self.eod, pad=self.pad)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path or '<in memory>'}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad}, fingerprint={self.fingerprint})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (its bytes: the processor itself does not pickle)."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_proto: bytes, path: Optional[str] = None):
        self.path = path
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()  # -1 when the model has no pad piece
        self.bos = self.sp.bos_id()
        self.unk = self.sp.unk_id()
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("a Hugging Face tokenizer needs the `tokenizers` library: pip install 'megamoe[hf]'") from None
    return tokenizers


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer from its tokenizer.json (bytes, so it pickles), with the EOD and pad ids
    taken from the files beside it (find_special_ids)."""

    type_name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_json: bytes, eod: int, pad: int = -1, path: Optional[str] = None):
        self.path, self._json, self.eod, self.pad = path, tokenizer_json, int(eod), int(pad)
        self.hf = _tokenizers().Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(max(vocab.values(), default=-1) + 1, self.hf.get_vocab_size(with_added_tokens=True))
        self.fingerprint = hashlib.sha256(tokenizer_json + f"\0eod={self.eod}".encode()).hexdigest()[:16]
        self._fast = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # no offsets: faster

    @property
    def tokenizer_json(self) -> bytes:
        """The tokenizer.json it was made from (what a Hugging Face export ships)."""
        return self._json

    def token(self, token_id: int) -> Optional[str]:
        return self.hf.id_to_token(int(token_id))

    def encode(self, text: str) -> list:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list:
        return [e.ids for e in self._fast(list(texts))]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self):
        return {"tokenizer_json": self._json, "eod": self.eod, "pad": self.pad, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["tokenizer_json"], state["eod"], state["pad"], state["path"])


def _json_file(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return value if isinstance(value, dict) else {}


def _token_name(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def find_special_ids(hf, folder: str) -> tuple:
    """(eod, pad) of a Hugging Face tokenizer: the eos and pad tokens named by tokenizer_config.json, else
    special_tokens_map.json, else config.json / generation_config.json's eos_token_id, else a usual end-of-text
    token of its vocabulary. eod None when none is found; pad -1 when it has none."""
    configs = [_json_file(folder, n) for n in ("tokenizer_config.json", "special_tokens_map.json")]

    def named(key: str) -> Optional[int]:
        for config in configs:
            name = _token_name(config.get(key))
            if name is not None and hf.token_to_id(name) is not None:
                return hf.token_to_id(name)
        return None

    eod = named("eos_token")
    for name in ("config.json", "generation_config.json"):
        if eod is None:
            value = _json_file(folder, name).get("eos_token_id")
            value = value[0] if isinstance(value, list) and value else value
            eod = value if isinstance(value, int) else None
    for name in HF_EOD_NAMES:
        if eod is None:
            eod = hf.token_to_id(name)
    pad = named("pad_token")
    return eod, -1 if pad is None else pad


def _load_hf(path: str) -> HuggingFaceTokenizer:
    folder, file = (path, os.path.join(path, HF_FILE)) if os.path.isdir(path) else (os.path.dirname(path), path)
    if not os.path.isfile(file):
        raise DataError(f"{path} has no {HF_FILE}; a Hugging Face tokenizer is a folder with tokenizer.json (as "
                        "Llama, Qwen or GPT-2 ship theirs: save one with tokenizer.save_pretrained(DIR))")
    with open(file, "rb") as f:
        data = f.read()
    tokenizers = _tokenizers()
    try:
        hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except BaseException as e:  # tokenizers raises an Exception, or a pyo3 PanicException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise DataError(f"{file} is not a Hugging Face tokenizer ({str(e).splitlines()[0] if str(e) else e}); "
                        "give the tokenizer.json that tokenizers / transformers wrote") from None
    eod, pad = find_special_ids(hf, folder)
    if eod is None:
        raise DataError(f"{path}: no end-of-document token: tokenizer_config.json names no eos_token and the "
                        f"vocabulary has none of {', '.join(HF_EOD_NAMES)}; add \"eos_token\": \"...\" to "
                        f"{os.path.join(folder, 'tokenizer_config.json')}")
    return HuggingFaceTokenizer(data, eod, pad, path)


def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a sentencepiece .model; for a Hugging Face tokenizer folder "
                        "pass --tokenizer-type HuggingFaceTokenizer")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        tok = SentencePieceTokenizer(proto, path)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a sentencepiece model ({str(e).splitlines()[0] if str(e) else e}); "
                        "pass the .model file tools/train_tokenizer.py wrote, not the .vocab") from None
    if tok.eod < 0:
        raise DataError(f"{path} has no eos piece to use as the end-of-document token; retrain it with "
                        "tools/train_tokenizer.py (which sets eos_id=3)")
    return tok


def load_tokenizer(path: str, tokenizer_type: Optional[str] = None) -> Tokenizer:
    """A sentencepiece .model or a Hugging Face tokenizer (a folder with tokenizer.json, or that file), by
    `tokenizer_type` (Megatron's --tokenizer-type names) or else by what `path` is; DataError when it is missing
    or unreadable."""
    if not path:
        raise DataError("no tokenizer model given; pass --tokenizer-model PATH (a sentencepiece .model, e.g. from "
                        "tools/train_tokenizer.py, or a Hugging Face tokenizer folder)")
    try:
        backend = tokenizer_backend(tokenizer_type, path)
    except ConfigError as e:
        raise DataError(str(e)) from None
    if not os.path.exists(path):
        raise DataError(f"tokenizer model {path} does not exist; train one with tools/train_tokenizer.py "
                        "or pass the tokenizer the data was preprocessed with")
    return _load_hf(path) if backend == "huggingface" else _load_sentencepiece(path)


def _chunks(texts: Iterator[str], chunk_chars: int) -> Iterator[str]:
    """Whole lines grouped into pieces of about chunk_chars; an overlong line is cut."""
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            while len(line) > chunk_chars:
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:chunk_chars]
                line = line[chunk_chars:]
            if size + len(line) > chunk_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def _capped(sentences: Iterator[str], max_sentences: int, stats: dict) -> Iterator[str]:
    for s in sentences:
        if stats["sentences"] >= max_sentences:
            return
        if s.strip():
            stats["sentences"] += 1
            stats["chars"] += len(s)
            yield s


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_tokenizer(inputs: Sequence[str] | str, model_prefix: str, vocab_size: int, model_type: str = "bpe",
                    max_sentences: int = 1_000_000, byte_fallback: bool = True,
                    json_keys: Sequence[str] = ("text",), user_defined_symbols: Sequence[str] = (),
                    character_coverage: float = 0.9995, text_mode: str = "file", chunk_chars: int = 2048,
                    num_threads: Optional[int] = None, verbose: bool = False, stats: Optional[dict] = None) -> str:
    """Train a sentencepiece model on the inputs (JSONL, text files, folders, globs, .gz), reading at
    most `max_sentences` chunks; writes <model_prefix>.model and .vocab (piece<TAB>score per line,
    newlines and tabs in pieces escaped) and returns the .model path.
    `stats`, when given, is filled with sentences/chars read and bad records skipped."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    specials = 4 + (256 if byte_fallback else 0) + len(user_defined_symbols)
    if vocab_size <= specials:
        raise DataError(f"--vocab-size {vocab_size} is too small: the special pieces"
                        f"{' and 256 byte-fallback pieces' if byte_fallback else ''} alone take {specials}")
    if max_sentences < 1:
        raise DataError(f"--max-sentences {max_sentences} must be >= 1")
    stats = {} if stats is None else stats
    stats.update(sentences=0, chars=0, skipped={})
    files = resolve_inputs(inputs)  # input errors surface here, not inside sentencepiece's reader
    sentences = _capped(_chunks(iter_texts(files, json_keys, text_mode, counts=stats["skipped"]), chunk_chars),
                        max_sentences, stats)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=byte_fallback, character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=4 * chunk_chars + 16,  # in bytes: chunk_chars characters of up to 4 bytes
            input_sentence_size=0,  # all sentences: the cap is applied while reading
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if stats["sentences"] == 0:
            raise DataError(f"no usable text in {inputs} (skipped: {stats['skipped'] or 'nothing'}); "
                            "check --input and --json-keys") from None
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model on "
                        f"{stats['sentences']} sentences ({stats['chars']} characters): {msg}; "
                        "lower --vocab-size or give more text") from None
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    path = model_prefix + ".model"
    tok = SentencePieceTokenizer(model.getvalue(), path)
    escape = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})  # one piece per line
    vocab = "".join(f"{tok.sp.id_to_piece(i).translate(escape)}\t{tok.sp.get_score(i):g}\n"
                    for i in range(tok.vocab_size))
    _write_atomic(model_prefix + ".vocab", vocab.encode("utf-8"))
    _write_atomic(path, model.getvalue())  # the .model last: its presence means training finished
    return path

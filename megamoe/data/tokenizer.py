"""SentencePiece tokenizers: training from a corpus stream, and the Tokenizer the datasets use.

Special pieces (sentencepiece control symbols, so no text ever encodes to them):
    0 <pad>  padding (megatron-core's GPTDataset masks the loss where the label is pad)
    1 <unk>
    2 <s>    bos (unused by GPT-style training, kept for compatibility)
    3 </s>   eos, used as the end-of-document token (EOD), as Megatron-LM's GPTSentencePieceTokenizer does
A model trained elsewhere works too: EOD is its eos id, pad its pad id (or -1 when it has none).

Training defaults suit code as well as prose: identity normalization and no whitespace folding, so
decode(encode(text)) == text (indentation included), whitespace-only pieces, digits split, and byte
fallback so any text encodes without <unk>. Documents are cut into chunks of whole lines of about
`chunk_chars` characters, each one sentencepiece "sentence", so newlines are part of the vocabulary.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator, Optional, Sequence

import sentencepiece as spm

from megamoe.data.inputs import iter_texts, resolve_inputs
from megamoe.errors import DataError

MODEL_TYPES = ("bpe", "unigram", "char", "word")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A sentencepiece model with what megatron-core's GPTDataset asks of a tokenizer:
    `vocab_size`, `eod`, `pad` and `unique_identifiers` (part of its index-cache key)."""

    def __init__(self, model_proto: bytes, path: Optional[str] = None):
        self.path = path
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()  # -1 when the model has no pad piece
        self.bos = self.sp.bos_id()
        self.unk = self.sp.unk_id()
        # Identifies the encoding (pieces, scores, normalizer), not where the file lives.
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "fingerprint": self.fingerprint,
                                   "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    @property
    def eos(self) -> int:
        return self.eod

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self):  # sentencepiece processors do not pickle; the model bytes do
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path or '<in memory>'}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad}, fingerprint={self.fingerprint})")


def load_tokenizer(path: str) -> Tokenizer:
    """Load a sentencepiece .model; a missing or unreadable file raises DataError."""
    if not path:
        raise DataError("no tokenizer model given; pass --tokenizer-model PATH (a sentencepiece .model, "
                        "e.g. from tools/train_tokenizer.py)")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer model {path} does not exist; train one with tools/train_tokenizer.py "
                        "or pass the .model the data was preprocessed with")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        tok = Tokenizer(proto, path)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a sentencepiece model ({str(e).splitlines()[0] if str(e) else e}); "
                        "pass the .model file tools/train_tokenizer.py wrote, not the .vocab") from None
    if tok.eod < 0:
        raise DataError(f"{path} has no eos piece to use as the end-of-document token; retrain it with "
                        "tools/train_tokenizer.py (which sets eos_id=3)")
    return tok


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
    tok = Tokenizer(model.getvalue(), path)
    escape = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})  # one piece per line
    vocab = "".join(f"{tok.sp.id_to_piece(i).translate(escape)}\t{tok.sp.get_score(i):g}\n"
                    for i in range(tok.vocab_size))
    _write_atomic(model_prefix + ".vocab", vocab.encode("utf-8"))
    _write_atomic(path, model.getvalue())  # the .model last: its presence means training finished
    return path

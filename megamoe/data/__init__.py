"""Data: the default corpus, tokenizers (sentencepiece, Hugging Face), preprocessing to Megatron .bin/.idx, datasets.

    write_default_corpus(path)                           the Python standard library as JSONL
    train_tokenizer(inputs, model_prefix, vocab_size)    a sentencepiece .model
    load_tokenizer(path, tokenizer_type=None)            a Tokenizer: sentencepiece .model or Hugging Face folder
    preprocess(inputs, tokenizer_model, output_prefix)   <prefix>_<key>_document.bin/.idx/.json
    build_data_iterators(cfg, dp_rank, dp_size, ...)     DP-sharded, resumable train/valid batches
"""
from megamoe.data.corpus import iter_default_documents, write_default_corpus
from megamoe.data.datasets import build_data_iterators, build_gpt_datasets
from megamoe.data.indexed import check_indexed_dataset, check_tokenizer_matches, merge_datasets, read_sidecar
from megamoe.data.inputs import resolve_inputs
from megamoe.data.preprocess import preprocess
from megamoe.data.records import iter_texts
from megamoe.data.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from megamoe.errors import DataError

__all__ = ["DataError", "HuggingFaceTokenizer", "SentencePieceTokenizer", "Tokenizer", "build_data_iterators",
           "build_gpt_datasets", "check_indexed_dataset", "check_tokenizer_matches", "iter_default_documents",
           "iter_texts", "load_tokenizer", "merge_datasets", "preprocess", "read_sidecar", "resolve_inputs",
           "train_tokenizer", "write_default_corpus"]

"""Data: the default corpus, sentencepiece tokenizers, preprocessing to Megatron .bin/.idx, datasets.

    write_default_corpus(path)                           the Python standard library as JSONL
    train_tokenizer(inputs, model_prefix, vocab_size)    a sentencepiece .model
    preprocess(inputs, tokenizer_model, output_prefix)   <prefix>_<key>_document.bin/.idx/.json
    build_data_iterators(cfg, dp_rank, dp_size, ...)     DP-sharded, resumable train/valid batches
"""
from megamoe.data.corpus import iter_default_documents, write_default_corpus
from megamoe.data.datasets import build_data_iterators, build_gpt_datasets
from megamoe.data.indexed import check_indexed_dataset, check_tokenizer_matches, merge_datasets, read_sidecar
from megamoe.data.inputs import iter_texts, resolve_inputs
from megamoe.data.preprocess import preprocess
from megamoe.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from megamoe.errors import DataError

__all__ = ["DataError", "Tokenizer", "build_data_iterators", "build_gpt_datasets", "check_indexed_dataset",
           "check_tokenizer_matches", "iter_default_documents", "iter_texts", "load_tokenizer", "merge_datasets",
           "preprocess", "read_sidecar", "resolve_inputs", "train_tokenizer", "write_default_corpus"]

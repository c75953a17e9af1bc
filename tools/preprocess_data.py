"""Tokenize a corpus into Megatron indexed datasets: <output-prefix>_<key>_document.bin/.idx.

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model tok.model \\
        --output-prefix data/corpus --append-eod --workers 2

Flags and output as Megatron-LM's tools/preprocess_data.py (the files are read unchanged by
megatron-core's IndexedDataset); --input also takes text files, folders and globs, .gz included, Parquet
files and Hugging Face datasets saved with save_to_disk (--json-keys names their columns). The tokenizer is a
sentencepiece .model or, with --tokenizer-type HuggingFaceTokenizer, a Hugging Face tokenizer folder (with
tokenizer.json, as Llama, Qwen or GPT-2 ship theirs).
Bad records (malformed JSON, missing key, non-UTF-8 bytes, empty text) are counted, reported with file
and line, and skipped; --strict stops at the first one. A <prefix>_<key>_document.json sidecar records
the tokenizer, so training with a different one fails with a clear error.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.config import TOKENIZER_TYPES  # noqa: E402
from megamoe.data import preprocess  # noqa: E402
from megamoe.errors import DataError, UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSONL / text / Parquet files, folders or globs (.gz ok), saved Hugging Face datasets")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys (Parquet / dataset columns) to extract; one output per key")
    group.add_argument("--split-sentences", action="store_true", help="not supported (documents are kept whole)")
    group.add_argument("--keep-newlines", action="store_true", help="accepted; newlines are always kept")
    group.add_argument("--text-mode", default="file", choices=["file", "line"],
                       help="text files: one document per file (default) or per line")
    group.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None, choices=list(TOKENIZER_TYPES),
                       help="sentencepiece (GPTSentencePieceTokenizer, SentencePieceTokenizer, Llama2Tokenizer) or "
                            "HuggingFaceTokenizer; default: told by --tokenizer-model (a folder is Hugging Face's)")
    group.add_argument("--tokenizer-model", required=True,
                       help="sentencepiece .model (tools/train_tokenizer.py) or a Hugging Face tokenizer folder")
    group.add_argument("--vocab-file", help="not supported: give a Hugging Face tokenizer folder instead")
    group.add_argument("--merge-file", help="not supported: give a Hugging Face tokenizer folder instead")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--lang", default="english", help="accepted for compatibility (sentence splitting only)")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx/.json")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="processes encoding in parallel")
    group.add_argument("--partitions", type=int, default=1,
                       help="cut the input into this many shards, each written by one worker, merged at the end")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted; documents always keep the input order")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.split_sentences:
            raise DataError("--split-sentences is not supported: documents are tokenized whole (GPT-style "
                            "pretraining does not need sentence splits); drop the flag")
        if args.vocab_file or args.merge_file:
            raise DataError("--vocab-file/--merge-file (GPT2BPETokenizer) are not supported; pass GPT-2's Hugging "
                            "Face tokenizer folder (with tokenizer.json) as --tokenizer-model and --tokenizer-type "
                            "HuggingFaceTokenizer, or a sentencepiece model from tools/train_tokenizer.py")
        stats = preprocess(args.input, args.tokenizer_model, args.output_prefix, json_keys=args.json_keys,
                           append_eod=args.append_eod, workers=args.workers, partitions=args.partitions,
                           strict=args.strict, log_interval=args.log_interval, text_mode=args.text_mode,
                           tokenizer_type=args.tokenizer_type)
    except UserError as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    skipped = sum(stats["skipped"].values())
    print(f"processed {stats['documents']} documents, {stats['tokens']} tokens, {stats['bytes'] / 1e6:.1f} MB in "
          f"{stats['seconds']:.1f} s ({stats['docs_per_s']:.0f} docs/s, {stats['mb_per_s']:.2f} MB/s, "
          f"{args.workers} workers, {stats['partitions']} partitions)"
          + (f"; skipped {skipped} bad records" if skipped else ""))
    for key, prefix in stats["outputs"].items():
        print(f"  {key}: {prefix}.bin/.idx  (train with --data-path {prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

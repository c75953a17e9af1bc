"""Train a sentencepiece tokenizer (BPE or unigram) from JSONL, text files, folders or globs (.gz too).

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok --vocab-size 8000

Writes <model-prefix>.model and .vocab. Reading streams the input and stops after --max-sentences
chunks (a chunk is a run of whole lines of about 2048 characters). Special pieces: 0 <pad>, 1 <unk>,
2 <s>, 3 </s> (the end-of-document token); byte fallback is on, so any text encodes without <unk>.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.data import train_tokenizer  # noqa: E402
from megamoe.data.tokenizer import MODEL_TYPES  # noqa: E402
from megamoe.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL / text files, folders or globs")
    parser.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", default="bpe", choices=MODEL_TYPES)
    parser.add_argument("--max-sentences", type=int, default=1_000_000, help="chunks read at most")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys whose text is used")
    parser.add_argument("--text-mode", default="file", choices=["file", "line"],
                        help="text files: one document per file, or per line")
    parser.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[], help="extra pieces kept whole")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, help="default: all cores")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = parser.parse_args(argv)
    start, stats = time.perf_counter(), {}
    try:
        path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
                               max_sentences=args.max_sentences, byte_fallback=not args.no_byte_fallback,
                               json_keys=args.json_keys, user_defined_symbols=args.user_defined_symbols,
                               character_coverage=args.character_coverage, text_mode=args.text_mode,
                               num_threads=args.num_threads, verbose=args.verbose, stats=stats)
    except UserError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    skipped = sum(stats["skipped"].values())
    print(f"wrote {path} ({args.vocab_size} pieces, {args.model_type}) from {stats['sentences']} chunks, "
          f"{stats['chars'] / 1e6:.1f}M characters in {time.perf_counter() - start:.1f} s"
          + (f"; skipped {skipped} bad records {stats['skipped']}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the embedded default corpus, the Python standard library's own sources and docs, as JSONL.

    python tools/make_default_corpus.py --output corpus.jsonl [--max-bytes 12M]

Every machine with Python has it, so no download is needed. One document per line:
{"text": ..., "source": path relative to the standard library}; the library and its docs come
first, its test suite last, so --max-bytes keeps the library.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.data import write_default_corpus  # noqa: E402
from megamoe.errors import UserError  # noqa: E402


def parse_size(text: str) -> int:
    """'12M', '500K', '1G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 12M, 500K or 1000000") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the JSONL file to write")
    parser.add_argument("--max-bytes", type=parse_size, help="stop before the file would exceed this size "
                        "(e.g. 12M); default: the whole library (about 30 MB)")
    args = parser.parse_args(argv)
    try:
        stats = write_default_corpus(args.output, max_bytes=args.max_bytes)
    except UserError as e:
        print(f"make_default_corpus: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['path']}: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB from "
          f"{stats['stdlib']}" + (" (stopped at --max-bytes)" if stats["truncated"] else "")
          + f" in {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

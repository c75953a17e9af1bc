"""Preprocessing throughput: megamoe.data.preprocess with 1 and 2 workers (and 2 partitions) against
a plain single-process loop of json.loads + sentencepiece encode + megatron-core IndexedDatasetBuilder,
all measured in this run on the same corpus (the default corpus, >= 20 MB) and tokenizer.

    python bench/bench_preprocess.py [--mb 24] [--vocab-size 8000] [--workdir DIR]

Prints a table of docs/s and MB/s (input bytes), CPU seconds (this process and its workers), and
each run's speed relative to the plain loop; also checks that every run wrote byte-identical files.
Worker speed-ups need idle cores: the load average is printed before and after.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data import load_tokenizer, preprocess, train_tokenizer, write_default_corpus  # noqa: E402
from megamoe.data.indexed import indexed_dataset, optimal_dtype  # noqa: E402


def plain_loop(corpus: str, tokenizer_model: str, prefix: str) -> dict:
    """The reference: what a minimal script does, one process, no checks."""
    start = time.perf_counter()
    tok = load_tokenizer(tokenizer_model)
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=optimal_dtype(tok.vocab_size))
    docs = nbytes = 0
    with open(corpus, "rb") as f:
        for line in f:
            nbytes += len(line)
            ids = tok.sp.encode(json.loads(line)["text"])
            ids.append(tok.eod)
            builder.add_document(ids, [len(ids)])
            docs += 1
    builder.finalize(prefix + ".idx")
    return dict(documents=docs, bytes=nbytes, seconds=time.perf_counter() - start)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, *args, **kwargs) -> dict:
    cpu = cpu_seconds()
    out = fn(*args, **kwargs)
    out["cpu"] = cpu_seconds() - cpu
    return out


def same_files(a: str, b: str) -> bool:
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return all(read(a + ext) == read(b + ext) for ext in (".bin", ".idx"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=24.0, help="corpus size in MB (at least 20 for the issue)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args(argv)
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = args.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    stats = write_default_corpus(corpus, max_bytes=int(args.mb * 1e6))
    tokenizer = train_tokenizer([corpus], os.path.join(work, "tok"), args.vocab_size, max_sentences=20000)
    print(f"corpus: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB (Python stdlib); "
          f"tokenizer: {args.vocab_size}-piece BPE; cores: {os.cpu_count()}, load average before: "
          f"{os.getloadavg()[0]:.1f}")

    rows = []
    ref = timed(plain_loop, corpus, tokenizer, os.path.join(work, "plain"))
    rows.append(("plain loop (encode + IndexedDatasetBuilder)", 1, 1, ref, os.path.join(work, "plain")))
    for workers, partitions in ((1, 1), (2, 1), (2, 2)):
        prefix = os.path.join(work, f"w{workers}p{partitions}")
        out = timed(preprocess, [corpus], tokenizer, prefix, append_eod=True, workers=workers,
                    partitions=partitions, progress=False)
        rows.append(("megamoe preprocess", workers, partitions, out, prefix + "_text_document"))

    print("\n| run | workers | partitions | docs/s | MB/s | seconds | CPU seconds | vs plain loop | identical output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, workers, partitions, r, prefix in rows:
        print(f"| {name} | {workers} | {partitions} | {r['documents'] / r['seconds']:.0f} | "
              f"{r['bytes'] / 1e6 / r['seconds']:.2f} | {r['seconds']:.2f} | {r['cpu']:.2f} | "
              f"{ref['seconds'] / r['seconds']:.2f}x | "
              f"{'yes' if same_files(prefix, rows[0][4]) else 'NO'} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

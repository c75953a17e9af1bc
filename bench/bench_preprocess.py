"""Preprocessing throughput against the tokenizer's floor, measured in the same run on the same documents.

    python bench/bench_preprocess.py [--mb 65] [--vocab-size 8000] [--workers 1,2,N] [--hf] [--workdir DIR]

The corpus is the default corpus (the Python standard library) cut into documents of about 5 KB and repeated
to --mb MB of JSONL; the tokenizer a sentencepiece BPE of --vocab-size pieces trained on it (--hf: also a
byte-level BPE of the `tokenizers` library, in a Hugging Face tokenizer folder).

The floor is the tokenizer alone: its own batch encode of every document's text, already decoded in memory, in
one thread, in batches of the blocks the pipeline reads, timed in CPU seconds (the better of two passes, so
other processes on the machine do not inflate it); with W workers the floor is that time / W, the best W
processes could do if nothing but tokenizing cost anything. Each megamoe run reads the JSONL, decodes, encodes
and writes .bin/.idx with 1, 2 and N (= the cores) workers, and with 2 partitions; the table gives docs/s and
MB/s (input bytes), wall and CPU seconds (this process and its workers), `vs floor` = (floor / W) / wall (the
target: >= 0.70 with 2 workers), `CPU vs floor` = floor / CPU seconds (the share of the run's work that is
tokenizing, which other load hardly moves), the 1-minute load average after the run, and whether it wrote the
bytes of a straightforward reference (json.loads, one encode per document, megatron-core's
IndexedDatasetBuilder: what Megatron-LM's tool does, in one process), also timed. Worker speed-ups need idle
cores: on a shared machine read the load column.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the floor is one thread, as each worker is

from megamoe.data import load_tokenizer, preprocess, train_tokenizer, write_default_corpus  # noqa: E402
from megamoe.data.indexed import indexed_dataset, optimal_dtype  # noqa: E402
from megamoe.data.records import BLOCK_BYTES  # noqa: E402


def make_corpus(path: str, mb: float, work: str) -> dict:
    """The default corpus in documents of about 5 KB of whole lines, repeated until `mb` MB."""
    whole = os.path.join(work, "stdlib.jsonl")
    write_default_corpus(whole, max_bytes=max(int(mb * 1e6), 200_000))
    sources = [json.loads(line)["text"] for line in open(whole, encoding="utf-8")]
    target, size, docs, rounds = int(mb * 1e6), 0, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while size < target:
            for text in sources:
                buf, chars = [], 0
                for line in text.splitlines(keepends=True) + [None]:
                    if line is not None:
                        buf.append(line)
                        chars += len(line)
                    if buf and (chars >= 5000 or line is None):
                        record = json.dumps({"text": "".join(buf), "source": f"round {rounds}"}) + "\n"
                        out.write(record)
                        size, docs, buf, chars = size + len(record.encode()), docs + 1, [], 0
                        if size >= target:
                            break
                if size >= target:
                    break
            rounds += 1
    return dict(documents=docs, bytes=size)


def make_hf_tokenizer(corpus: str, folder: str, vocab_size: int) -> str:
    """A byte-level BPE trained with the `tokenizers` library, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for _, line in zip(range(2000), open(corpus, encoding="utf-8"))]
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return folder


def floor_seconds(corpus: str, tokenizer) -> float:
    """CPU seconds of the tokenizer's own batch encode of every text, one thread, in the pipeline's blocks: the
    better of two passes."""
    batches, batch, size = [], [], 0
    with open(corpus, "rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            size += len(line)
            if size >= BLOCK_BYTES:
                batches.append(batch)
                batch, size = [], 0
    batches.append(batch)
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        for b in batches:
            tokenizer.encode_batch(b)
        best = min(best, time.process_time() - start)
    return best


def reference(corpus: str, tokenizer_model: str, prefix: str) -> dict:
    """One process: json.loads, one encode per document, megatron-core's IndexedDatasetBuilder."""
    start = time.perf_counter()
    tok = load_tokenizer(tokenizer_model)
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=optimal_dtype(tok.vocab_size))
    docs = nbytes = 0
    with open(corpus, "rb") as f:
        for line in f:
            nbytes += len(line)
            ids = tok.encode(json.loads(line)["text"])
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
    out["load"] = os.getloadavg()[0]
    return out


def same_files(a: str, b: str) -> bool:
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return all(read(a + ext) == read(b + ext) for ext in (".bin", ".idx"))


def table(name: str, corpus: str, tokenizer_model: str, work: str, workers: list, with_reference: bool) -> None:
    tok = load_tokenizer(tokenizer_model)
    floor = floor_seconds(corpus, tok)
    rows, ref_prefix = [], None
    if with_reference:
        ref_prefix = os.path.join(work, f"{name}_reference")
        rows.append(("reference loop (one encode per doc + IndexedDatasetBuilder)", 1, 1,
                     timed(reference, corpus, tokenizer_model, ref_prefix), ref_prefix))
    for w, p in [(w, 1) for w in workers] + [(2, 2)]:
        prefix = os.path.join(work, f"{name}_w{w}p{p}")
        out = timed(preprocess, [corpus], tokenizer_model, prefix, append_eod=True, workers=w, partitions=p,
                    progress=False)
        rows.append(("megamoe preprocess", w, p, out, prefix + "_text_document"))
    docs = rows[-1][3]["documents"]
    print(f"\n{name}: floor = {tok.type_name} batch encode of the {docs} documents, 1 thread: {floor:.2f} CPU s "
          f"({docs / floor:.0f} docs/s)")
    print("\n| run | workers | partitions | docs/s | MB/s | seconds | CPU seconds | floor docs/s | vs floor "
          "| CPU vs floor | load | identical output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = ref_prefix or rows[0][4]
    for run, w, p, r, prefix in rows:
        floor_rate = docs * w / floor
        print(f"| {run} | {w} | {p} | {r['documents'] / r['seconds']:.0f} | {r['bytes'] / 1e6 / r['seconds']:.2f} | "
              f"{r['seconds']:.2f} | {r['cpu']:.2f} | {floor_rate:.0f} | "
              f"{r['documents'] / r['seconds'] / floor_rate:.2f} | {floor / r['cpu']:.2f} | {r['load']:.1f} | "
              f"{'yes' if same_files(prefix, base) else 'NO'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=65.0, help="corpus size in MB (the issue measured 65)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1,2,N cores)")
    parser.add_argument("--hf", action="store_true", help="also a Hugging Face byte-level BPE of the same size")
    parser.add_argument("--no-reference", action="store_true", help="skip the one-process reference loop")
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else sorted({1, 2, cores}))
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = args.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    stats = make_corpus(corpus, args.mb, work)
    tokenizer = train_tokenizer([corpus], os.path.join(work, "tok"), args.vocab_size, max_sentences=20000)
    print(f"corpus: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB (Python stdlib, ~5 KB documents); "
          f"tokenizer: {args.vocab_size}-piece BPE; cores: {cores}, load average before: {os.getloadavg()[0]:.1f}")
    table("sentencepiece", corpus, tokenizer, work, workers, not args.no_reference)
    if args.hf:
        hf = make_hf_tokenizer(corpus, os.path.join(work, "hf_tokenizer"), args.vocab_size)
        table("huggingface", corpus, hf, work, workers, False)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""megamoe-quickstart: the main job, end to end on the embedded default corpus, on CPU, in minutes.

    megamoe-quickstart [--workdir quickstart] [--train-iters 300] [--nproc 2]

1. the corpus: the Python standard library's own sources, extracted to JSONL;
2. a sentencepiece BPE tokenizer trained on it;
3. the corpus preprocessed to Megatron .bin/.idx;
4. the small MoE-Mamba of megamoe/configs/quickstart.yaml trained on `--nproc` gloo processes with
   expert parallelism over them (torchrun), writing metrics.jsonl, loss.png and a checkpoint;
   then a short sample from the checkpoint.
Steps 1-3 are skipped when their outputs already exist, so a second run goes straight to training.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import yaml

from megamoe.data import preprocess, train_tokenizer, write_default_corpus
from megamoe.inference import checkpoint_tokenizer, generate, load_for_inference
from megamoe.logging import get_logger, read_metrics

log = get_logger()

QUICKSTART_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.yaml")
CORPUS_BYTES = 12 * 1024 * 1024
VOCAB_SIZE = 4096


def prepare_data(workdir: str, workers: int) -> tuple:
    """Corpus -> tokenizer -> .bin/.idx under workdir; returns (data prefix, tokenizer model)."""
    corpus = os.path.join(workdir, "corpus.jsonl")
    if not os.path.exists(corpus):
        log.info(f"[1/4] extracting the default corpus (Python's standard library) to {corpus}")
        write_default_corpus(corpus, max_bytes=CORPUS_BYTES)
    tokenizer = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(tokenizer):
        log.info(f"[2/4] training a {VOCAB_SIZE}-piece BPE tokenizer -> {tokenizer}")
        train_tokenizer([corpus], os.path.join(workdir, "tokenizer"), VOCAB_SIZE, model_type="bpe",
                        max_sentences=200_000)
    prefix = os.path.join(workdir, "data", "corpus")
    data = prefix + "_text_document"
    if not os.path.exists(data + ".idx"):
        log.info(f"[3/4] preprocessing to {data}.bin/.idx with {workers} workers")
        preprocess([corpus], tokenizer, prefix, append_eod=True, workers=workers)
    return data, tokenizer


def sample(checkpoint: str, prompt: str = "def ", tokens: int = 48) -> str:
    """A continuation of `prompt` by the trained model (recurrent decoding, one process, fixed seed)."""
    model, cfg = load_for_inference(checkpoint)
    tokenizer = checkpoint_tokenizer(cfg)
    ids = generate(model, tokenizer.encode(prompt), tokens, temperature=0.8, top_p=0.95, seed=0,
                   eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)
    return prompt + tokenizer.decode(ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart")
    parser.add_argument("--train-iters", type=int, help="default: the config's (300)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes; expert parallel size = nproc")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    data, tokenizer = prepare_data(workdir, workers=2)

    run_dir = os.path.join(workdir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time; the data above is reused
    with open(QUICKSTART_CONFIG) as f:
        config = yaml.safe_load(f)
    if args.train_iters:
        config["training"]["train_iters"] = args.train_iters
    config["data"].update(data_path=[data], tokenizer_model=tokenizer)
    config["parallel"] = {"expert_model_parallel_size": args.nproc}
    config["checkpoint"] = {"save": os.path.join(run_dir, "checkpoints")}
    config["logging"]["log_dir"] = run_dir
    config_path = os.path.join(workdir, "quickstart.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)

    log.info(f"[4/4] training on {args.nproc} gloo processes (expert parallel {args.nproc}): {config_path}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "megamoe.cli.train", "--config", config_path]
    # torchrun would otherwise set one thread per process and say so; share this machine's cores out ourselves.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    if subprocess.run(cmd, env=env).returncode != 0:
        log.error(f"training failed; rerun it alone with: {' '.join(cmd)}")
        return 1
    records = [r for r in read_metrics(run_dir) if "lm_loss" in r]
    first, last = records[0], records[-1]
    log.info(f"done in {time.perf_counter() - start:.0f} s: LM loss {first['lm_loss']:.3f} (step {first['step']}) "
             f"-> {last['lm_loss']:.3f} (step {last['step']})"
             + (f", valid loss {last['valid_loss']:.3f}" if "valid_loss" in last else ""))
    log.info(f"  sample:     {sample(os.path.join(run_dir, 'checkpoints'))!r}")
    log.info(f"  metrics:    {os.path.join(run_dir, 'metrics.jsonl')}")
    log.info(f"  loss curve: {os.path.join(run_dir, 'loss.png')}")
    log.info(f"  checkpoint: {os.path.join(run_dir, 'checkpoints')}")
    log.info(f"  config:     {config_path}  (rerun: megamoe-train --config {config_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

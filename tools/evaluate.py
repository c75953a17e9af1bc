"""Loss and perplexity of a checkpoint on held-out data, in one process with no process group (CPU by default), or
tensor-parallel over N processes for a model larger than one device (rank 0 prints):

    python tools/evaluate.py --load ckpt/run1 --split valid                 the valid part of the run's data
    python tools/evaluate.py --load ckpt/run1 --data-path data/other_text_document   a whole preprocessed dataset
    python tools/evaluate.py --load ckpt/run1 --text-file notes.txt docs.jsonl       raw files, tokenized here
    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/run1 --split valid --tensor-model-parallel-size 2

--split valid|test takes that part of --data-path (default: the checkpoint's training data) with the run's
split weights (--split-weights to change them); --data-path alone takes the whole dataset. Every token is
scored once, in windows of --seq-length (default: the run's) that carry no context between them
(megamoe/inference/evaluation.py). Prints loss and perplexity; --json prints one JSON object instead.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megamoe.checkpoint import load_config  # noqa: E402
from megamoe.errors import DataError, UserError  # noqa: E402
from megamoe.inference import (  # noqa: E402
    add_loading_arguments,
    checkpoint_tokenizer,
    dataset_batches,
    evaluate_perplexity,
    load_for_inference,
    text_batches,
)
from megamoe.parallel import destroy_distributed, detect_launch_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder, or a --save folder (its latest)")
    parser.add_argument("--split", choices=["train", "valid", "test", "all"], default=None,
                        help="which part of the dataset (default: all with --data-path, else required)")
    parser.add_argument("--split-weights", default=None, help="train,valid,test weights (default: the run's --split)")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="preprocessed dataset prefixes (default: the checkpoint's training data)")
    parser.add_argument("--text-file", nargs="+", default=None, help="JSONL / text files, folders or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the JSONL records to score")
    parser.add_argument("--seq-length", type=int, default=None, help="window length (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="MoE capacity for evaluation (default: the model's; 0: no token dropped)")
    add_loading_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def batches_for(args, cfg, seq_length: int):
    """(batches, a description of the source) for the command line's choice of data."""
    if args.text_file:
        if args.data_path or args.split:
            raise DataError("--text-file scores raw files; drop --data-path / --split, or score a dataset instead")
        tokenizer = checkpoint_tokenizer(cfg, args.tokenizer_model, tokenizer_type=args.tokenizer_type)
        return (text_batches(args.text_file, tokenizer, seq_length, args.batch_size, args.json_keys,
                             vocab_size=cfg.model.vocab_size), " ".join(args.text_file))
    data_path = args.data_path or list(cfg.data.data_path)
    if not args.data_path and not args.split:
        raise DataError("say what to score: --split valid|test (a part of the run's data), --data-path PREFIX or "
                        "--text-file F")
    if not data_path:
        raise DataError("the checkpoint's config has no data path (trained on mock data?); pass --data-path")
    part = args.split or "all"
    split = args.split_weights or cfg.data.split
    tokenizer = checkpoint_tokenizer(cfg, args.tokenizer_model, required=False,  # checks the data's tokenizer
                                     tokenizer_type=args.tokenizer_type)
    batches = dataset_batches(data_path, seq_length, args.batch_size, part, split, tokenizer, cfg.model.vocab_size)
    where = " ".join(map(str, data_path)) + ("" if part == "all" else f" ({part} of --split {split})")
    return batches, where


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = detect_launch_env().rank == 0  # the rank that prints (every rank of a TP launch scores)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = load_config(args.load)
        seq_length = args.seq_length or cfg.data.seq_length
        if seq_length < 1 or args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
            raise DataError(f"--seq-length {seq_length}, --batch-size {args.batch_size} and --max-batches "
                            f"{args.max_batches} must be >= 1")
        batches, source = batches_for(args, cfg, seq_length)  # data checks before the model is loaded
        start = time.perf_counter()
        model, _ = load_for_inference(args.load, args.device, args.tensor_parallel)
        if first:
            print(f"loaded {args.load} in {time.perf_counter() - start:.1f} s; scoring {source}", file=sys.stderr)
        start = time.perf_counter()
        result = evaluate_perplexity(model, batches, args.max_batches, args.capacity_factor)
    except UserError as e:
        if first:
            print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.tensor_parallel != 1:
            destroy_distributed()
    result.update(source=source, seq_length=seq_length, seconds=time.perf_counter() - start)
    if not first:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  ({result['tokens']} tokens in "
              f"{result['batches']} batches of {source}, {result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

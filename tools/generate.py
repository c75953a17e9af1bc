"""Continue a prompt with a trained checkpoint, recurrently (constant memory per sequence for Mamba/MoE models).

    python tools/generate.py --load ckpt/run1 --prompt "import os" --max-new-tokens 64 --temperature 0.8 --top-p 0.95

Runs in one process with no process group, on CPU by default; the checkpoint may have been saved in any
TP/PP/EP/DP layout. A model larger than one device runs tensor-parallel over N processes, rank 0 printing:

    torchrun --nproc-per-node 2 tools/generate.py --load ckpt/run1 --tensor-model-parallel-size 2 --device cuda

The tokenizer is the one named in the checkpoint's config unless --tokenizer-model is given. The continuation is
printed on stdout (status lines go to stderr); --num-samples N continues the prompt N times in one batch; --json
prints one JSON object instead. An empty prompt starts a new document (EOD).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megamoe.checkpoint import load_config  # noqa: E402
from megamoe.errors import DataError, InferenceError, UserError  # noqa: E402
from megamoe.inference import (  # noqa: E402
    add_loading_arguments,
    checkpoint_tokenizer,
    compile_decoding,
    generate,
    load_for_inference,
)
from megamoe.parallel import destroy_distributed, detect_launch_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder, or a --save folder (its latest)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a file whose whole text is the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample in the nucleus of this probability")
    parser.add_argument("--seed", type=int, default=None,
                        help="makes sampling reproducible (default: a fresh one, printed on stderr)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, in one batch")
    parser.add_argument("--no-stop-at-eod", action="store_true", help="keep going past the end-of-document token")
    add_loading_arguments(parser, decoding=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object with the samples and timings")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = detect_launch_env().rank == 0  # the rank that prints (every rank of a TP launch runs this)
    try:
        if args.num_samples < 1:
            raise InferenceError(f"--num-samples {args.num_samples} must be >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        text = args.prompt
        if args.prompt_file:
            if not os.path.isfile(args.prompt_file):
                raise DataError(f"--prompt-file {args.prompt_file} does not exist")
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        start = time.perf_counter()
        tokenizer = checkpoint_tokenizer(load_config(args.load), args.tokenizer_model,
                                         tokenizer_type=args.tokenizer_type)  # before the model
        model, _ = load_for_inference(args.load, args.device, args.tensor_parallel, args.bf16)
        if args.compile:
            compiling = time.perf_counter()
            compile_decoding(model, [args.num_samples])
            if first:
                print(f"decode steps compiled in {time.perf_counter() - compiling:.1f} s", file=sys.stderr)
        ids = tokenizer.encode(text) or [tokenizer.eod]
        loaded = time.perf_counter()
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        if first:
            print(f"loaded {args.load} in {loaded - start:.1f} s; prompt of {len(ids)} tokens; seed {seed}",
                  file=sys.stderr)
        rows = generate(model, [ids] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eod=None if args.no_stop_at_eod else tokenizer.eod,
                        seed=seed, vocab_size=tokenizer.vocab_size)
    except UserError as e:
        if first:
            print(f"generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.tensor_parallel != 1:
            destroy_distributed()
    seconds = time.perf_counter() - loaded
    texts = [tokenizer.decode([t for t in row if t != tokenizer.eod]) for row in rows]
    new_tokens = sum(len(row) for row in rows)
    rate = new_tokens / max(seconds, 1e-9)
    if not first:
        return 0
    if args.json:
        print(json.dumps(dict(prompt=text, samples=texts, tokens=rows, seed=seed, new_tokens=new_tokens,
                              seconds=seconds, tokens_per_s=rate)))
        return 0
    for i, continuation in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(continuation)
    print(f"{new_tokens} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

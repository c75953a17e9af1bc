"""Serve a trained checkpoint over HTTP with an OpenAI-compatible completions endpoint, batching requests.

    python tools/serve.py --load ckpt/run1 --port 8000 --max-batch-size 8
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "import os", "max_tokens": 32, "temperature": 0}'

POST /v1/completions (prompt: a string or a list of them, max_tokens, temperature, top_p, top_k, stop, stream,
seed) and GET /v1/models; see megamoe/inference/server.py. Concurrent requests decode together in up to
--max-batch-size slots (continuous batching: a finished sequence's slot takes the next waiting prompt). Runs in
one process on CPU by default; the checkpoint may have been saved in any TP/PP/EP/DP layout. --port 0 picks a
free port; the address is printed on stderr once the server listens. A model larger than one device is served
tensor-parallel, rank 0 listening and the other ranks following its engine:

    torchrun --nproc-per-node 2 tools/serve.py --load ckpt/run1 --tensor-model-parallel-size 2 --device cuda
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megamoe import checkpoint  # noqa: E402
from megamoe.errors import InferenceError, UserError  # noqa: E402
from megamoe.inference import (  # noqa: E402
    Engine,
    add_loading_arguments,
    checkpoint_tokenizer,
    compile_decoding,
    load_for_inference,
)
from megamoe.inference.engine import follow  # noqa: E402
from megamoe.inference.server import CompletionServer  # noqa: E402
from megamoe.parallel import destroy_distributed, detect_launch_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder, or a --save folder (its latest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoding at once (slots)")
    parser.add_argument("--max-length", type=int, default=4096,
                        help="the most tokens (prompt + max_tokens) one completion may have")
    parser.add_argument("--model-name", help="the name clients use (default: the checkpoint folder's name)")
    add_loading_arguments(parser, decoding=True)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = detect_launch_env().rank == 0  # the rank that serves (the others of a TP launch follow it)
    engine = None
    try:
        for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-length", args.max_length)):
            if value < 1:
                raise InferenceError(f"{flag} {value} must be >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        tokenizer = checkpoint_tokenizer(checkpoint.load_config(args.load), args.tokenizer_model,
                                         tokenizer_type=args.tokenizer_type)  # before the model
        model, _ = load_for_inference(args.load, args.device, args.tensor_parallel, args.bf16)
        if args.compile:
            print(f"compiling the decode steps of {args.max_batch_size} slots", file=sys.stderr, flush=True)
            compile_decoding(model, [args.max_batch_size])
        if not first:
            follow(model, args.max_batch_size)
            return 0
        engine = Engine(model, slots=args.max_batch_size, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size,
                        decode=tokenizer.decode, max_length=args.max_length)
        name = args.model_name or os.path.basename(os.path.normpath(args.load))
        try:
            server = CompletionServer(engine, tokenizer, name, args.host, args.port)
        except OSError as e:
            raise InferenceError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port")
        print(f"serving {name} on {server.url} ({args.max_batch_size} slots); Ctrl-C stops", file=sys.stderr,
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            engine.shutdown()
            server.engine_thread.join(30)  # its last act releases the other TP ranks
    except UserError as e:
        if engine is not None:
            engine.close()  # the other TP ranks wait in follow()
        if first:
            print(f"serve: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.tensor_parallel != 1:
            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

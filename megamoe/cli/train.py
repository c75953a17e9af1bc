"""megamoe-train: pretrain a model from a YAML config and command-line overrides.

    megamoe-train --config megamoe/configs/quickstart.yaml --data-path ... --tokenizer-model ... --train-iters 100
    torchrun --nproc_per_node 2 -m megamoe.cli.train --config ... --expert-model-parallel-size 2
    mpirun -n 2 megamoe-train --config ...

Every key is `--section.key value`; Megatron's flags (--tensor-model-parallel-size, --lr, --save ...)
are accepted too. `--help-config` lists them all.
"""
import argparse
import sys

from megamoe.config import add_config_arguments, build_config, describe_keys
from megamoe.data import load_tokenizer
from megamoe.errors import ConfigError, UserError
from megamoe.model import count_parameters
from megamoe.training import train


def print_params(cfg) -> None:
    """Total and active parameters, with and without embeddings (the paper counts without), of the model training
    builds: its vocabulary padded as training pads it."""
    if cfg.model.vocab_size is None:
        if not cfg.data.tokenizer_model:
            raise ConfigError("--print-params needs the vocabulary: set --model.vocab_size or --tokenizer-model")
        tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        cfg.model.vocab_size = cfg.model.padded_vocab_size(tokenizer.vocab_size,
                                                           cfg.parallel.tensor_model_parallel_size,
                                                           cfg.data.tokenizer_model)
    c = count_parameters(cfg.model)
    print(f"pattern {cfg.model.pattern}, d_model {cfg.model.d_model}, vocab {cfg.model.vocab_size}")
    print(f"{'':<22}{'total':>10}{'active':>10}")
    print(f"{'without embeddings':<22}{c['total_non_embedding'] / 1e6:>9.1f}M{c['active_non_embedding'] / 1e6:>9.1f}M")
    print(f"{'with embeddings':<22}{c['total'] / 1e6:>9.1f}M{c['active'] / 1e6:>9.1f}M")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--print-params", action="store_true",
                        help="print total and active parameter counts of the configured model, then exit")
    args, overrides = parser.parse_known_args(argv)
    if args.help_config:
        print(describe_keys())
        return 0
    try:
        cfg = build_config(args.config, overrides)
        if args.print_params:
            print_params(cfg)
            return 0
        summary = train(cfg)
    except UserError as e:  # what the user gave (config, data, checkpoint): one clear line, no traceback
        print(f"megamoe-train: error: {e}", file=sys.stderr)
        return 2
    final = summary["final"]
    if summary.get("metrics"):
        print(f"[megamoe] done: step {summary['step']}, loss {final.get('loss', float('nan')):.4f}; "
              f"metrics {summary['metrics']}, plot {summary['plot']}"
              + (f", checkpoint {summary['checkpoint']}" if summary["checkpoint"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

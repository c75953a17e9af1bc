"""Inspect, re-shard, consolidate or export a megamoe checkpoint, offline on CPU (no process group).

    python tools/convert_checkpoint.py CKPT --inspect
    python tools/convert_checkpoint.py CKPT --output OUT --target-layout tp=1,pp=1,ep=4
    python tools/convert_checkpoint.py CKPT --output OUT --format consolidated
    python tools/convert_checkpoint.py CKPT --output OUT --format hf

CKPT is a checkpoint folder or a --save folder (its `latest` is taken). Checkpoints are layout-free: every
one loads directly into any TP/PP/EP/DP layout the model divides into. --target-layout checks that the
layout fits the model and rewrites the checkpoint with its stored chunks cut to that layout's shards (each
rank then reads one chunk per tensor). --format consolidated writes one model.safetensors with whole tensors
and config.yaml; --format hf a folder that transformers.MambaForCausalLM.from_pretrained loads (Mamba-only
models).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.checkpoint.convert import inspect, reshard  # noqa: E402
from megamoe.checkpoint.export import consolidate, export_hf  # noqa: E402
from megamoe.errors import CheckpointError, UserError  # noqa: E402

LAYOUT_KEYS = ("tp", "pp", "ep", "etp", "dp")


def parse_layout(text: str) -> dict:
    """"tp=1,pp=1,ep=4" -> {"tp": 1, "pp": 1, "ep": 4}."""
    layout = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        key, _, value = part.partition("=")
        if key not in LAYOUT_KEYS or not value.isdigit() or int(value) < 1:
            raise CheckpointError(f"--target-layout {text!r}: give key=value pairs with keys {LAYOUT_KEYS} and "
                                  "positive sizes, e.g. tp=1,pp=1,ep=4")
        layout[key] = int(value)
    return layout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, or a --save folder with a `latest` marker")
    parser.add_argument("--inspect", action="store_true", help="list tensors, global shapes, saved layout, step")
    parser.add_argument("--output", help="folder to write (a --save-style folder for --format dcp)")
    parser.add_argument("--format", default="dcp", choices=["dcp", "consolidated", "hf"],
                        help="dcp: a megamoe checkpoint (with --target-layout); consolidated: model.safetensors + "
                             "config.yaml; hf: transformers MambaForCausalLM folder")
    parser.add_argument("--target-layout", default="",
                        help="tp=..,pp=..,ep=..[,etp=..][,dp=..] for --format dcp (dp: fewest that fit if unset)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.inspect:
            print(inspect(args.checkpoint))
            return 0
        if not args.output:
            raise CheckpointError("give --output FOLDER (or --inspect)")
        if args.format == "consolidated":
            out = consolidate(args.checkpoint, args.output)
        elif args.format == "hf":
            out = export_hf(args.checkpoint, args.output)
        else:
            if not args.target_layout:
                raise CheckpointError("--format dcp needs --target-layout (e.g. tp=1,pp=1,ep=4); a checkpoint "
                                      "already loads into any layout, this only re-cuts its stored chunks")
            out = reshard(args.checkpoint, args.output, **parse_layout(args.target_layout))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

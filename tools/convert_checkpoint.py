"""Inspect, re-shard, consolidate or export a megamoe checkpoint, or import a Hugging Face folder, offline on CPU
(no process group).

    python tools/convert_checkpoint.py CKPT --inspect
    python tools/convert_checkpoint.py CKPT --output OUT --target-layout tp=1,pp=1,ep=4
    python tools/convert_checkpoint.py CKPT --output OUT --format consolidated
    python tools/convert_checkpoint.py CKPT --output OUT --format hf [--tokenizer-model tok.model]
    python tools/convert_checkpoint.py --from-hf DIR --output OUT [--target-layout tp=2,ep=2] [--set pattern=MEME]

CKPT is a checkpoint folder or a --save folder (its `latest` is taken). Checkpoints are layout-free: every
one loads directly into any TP/PP/EP/DP layout the model divides into. --target-layout checks that the
layout fits the model and rewrites the checkpoint with its stored chunks cut to that layout's shards (each
rank then reads one chunk per tensor). --format consolidated writes one model.safetensors with whole tensors
and config.yaml. --format hf writes a transformers folder with the tokenizer: MambaForCausalLM for Mamba-only
models, else megamoe's model as remote code (AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)).
--from-hf reads a transformers MambaForCausalLM folder (the public state-spaces Mamba layout) or a megamoe HF
export into a weights-only checkpoint at step 0 (train from it with --load OUT --finetune); --set model keys
change the model, e.g. --set pattern=MEMEMEME upcycles a 4-layer Mamba into MoE-Mamba (new layers from the seed).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.checkpoint.convert import inspect, reshard  # noqa: E402
from megamoe.checkpoint.export import consolidate  # noqa: E402
from megamoe.checkpoint.hf_export import export_hf  # noqa: E402
from megamoe.checkpoint.hf_import import import_hf  # noqa: E402
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


def parse_sets(items: list) -> dict:
    """["pattern=MEME", "num_experts=8"] -> {"pattern": "MEME", "num_experts": "8"} (typed by the config)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CheckpointError(f"--set {item!r}: give model keys as key=value, e.g. --set pattern=MEME")
        out[key.removeprefix("model.")] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint folder, or a --save folder with a `latest` marker")
    parser.add_argument("--inspect", action="store_true", help="list tensors, global shapes, saved layout, step")
    parser.add_argument("--output", help="folder to write (a --save-style folder for --format dcp and --from-hf)")
    parser.add_argument("--format", default="dcp", choices=["dcp", "consolidated", "hf"],
                        help="dcp: a megamoe checkpoint (with --target-layout); consolidated: model.safetensors + "
                             "config.yaml; hf: a transformers folder (MambaForCausalLM or megamoe's remote code)")
    parser.add_argument("--target-layout", default="",
                        help="tp=..,pp=..,ep=..[,etp=..][,dp=..] for --format dcp and --from-hf (dp: fewest that "
                             "fit if unset)")
    parser.add_argument("--tokenizer-model", help="for --format hf: the sentencepiece .model to ship (default: the "
                                                  "checkpoint's)")
    parser.add_argument("--from-hf", metavar="DIR", help="import a transformers folder as a megamoe checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --from-hf: a model key to change (repeatable), e.g. pattern=MEME to upcycle")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.set and not args.from_hf:
            raise CheckpointError("--set changes the model of an import: use it with --from-hf DIR")
        if args.tokenizer_model and args.format != "hf":
            raise CheckpointError("--tokenizer-model names the tokenizer an HF export ships: use it with --format hf")
        if args.from_hf:
            if not args.output:
                raise CheckpointError("--from-hf needs --output FOLDER for the megamoe checkpoint")
            out = import_hf(args.from_hf, args.output, model_overrides=parse_sets(args.set),
                            **parse_layout(args.target_layout))
            print(f"wrote {out}")
            return 0
        if not args.checkpoint:
            raise CheckpointError("give a checkpoint folder (or --from-hf DIR)")
        if args.inspect:
            print(inspect(args.checkpoint))
            return 0
        if not args.output:
            raise CheckpointError("give --output FOLDER (or --inspect)")
        if args.format == "consolidated":
            out = consolidate(args.checkpoint, args.output)
        elif args.format == "hf":
            out = export_hf(args.checkpoint, args.output, args.tokenizer_model)
            print("load it with transformers (pip install megamoe[hf]): AutoModelForCausalLM.from_pretrained("
                  f"{out!r}, trust_remote_code=True)", file=sys.stderr)
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

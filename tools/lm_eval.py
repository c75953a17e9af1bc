"""lm-evaluation-harness's command line with megamoe registered as a model (`--model megamoe`).

    python tools/lm_eval.py --model megamoe --model_args load=ckpt/run1,device=cuda --tasks hellaswag,arc_easy \
        --batch_size 8 [--include_path my_tasks/] [--output_path results/ --log_samples]

Everything after the program name is lm_eval's own arguments (`lm_eval --help`); model_args for megamoe: load
(a checkpoint folder or a --save folder, any saved layout), device, batch_size, max_length (default: the run's
seq_length), max_gen_toks, tokenizer_model (default: the checkpoint's), seed. Needs `pip install megamoe[eval]`.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named like the harness's package: keep its folder off the import path, put the checkout on it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.dirname(HERE))

from megamoe.errors import UserError  # noqa: E402

try:
    import megamoe.inference.harness  # noqa: E402, F401  (registers "megamoe" with lm_eval; says the extra)
except UserError as e:
    print(f"lm_eval: error: {e}", file=sys.stderr)
    sys.exit(2)

from lm_eval.__main__ import cli_evaluate  # noqa: E402


def main(argv=None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except UserError as e:
        print(f"lm_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

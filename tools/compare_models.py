"""Compare models as the paper does: train each on the same data, budget, schedule and seed; plot and tabulate.

    python tools/compare_models.py                                   # the default study on the quickstart corpus
    python tools/compare_models.py --sweep num_experts=8,32 --models mamba moe_mamba
    python tools/compare_models.py --workdir study25m --base examples/paper/moe_mamba_25m.yaml \\
        --models mamba=examples/paper/mamba_25m.yaml moe_mamba=examples/paper/moe_mamba_25m.yaml \\
        --data-path DATA --tokenizer-model TOK --nproc 8 -- --expert-model-parallel-size 8

Writes <workdir>/study.png, study.md and study.json; rerunning the same command resumes an interrupted study.
`--help` lists the built-in models and every option (megamoe.cli.study).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.cli.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

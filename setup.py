"""megamoe: distributed pretraining of MoE-Mamba language models (Mamba-1 + Switch MoE)."""
from setuptools import find_packages, setup

packages = find_packages(include=["megamoe", "megamoe.*"])

setup(
    name="megamoe",
    version="0.1.0",
    description="Distributed pretraining of MoE-Mamba language models with Megatron-style parallelism",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    # The Hugging Face remote code copied into `--format hf` exports (not imported by megamoe itself)
    package_data={"megamoe": ["configs/*.yaml", "checkpoint/hf_modeling/*.py"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "triton>=3.0",
        "sentencepiece>=0.2",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "orjson",  # the fast JSON decoder of preprocessing (the standard library's json is the fallback)
    ],
    # Optional: each front end that needs one names its extra when it is missing.
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "mpi": ["mpi4py", "mpich"],
        "parquet": ["pyarrow"],  # Parquet inputs
        # Hugging Face: loading the --format hf exports (writing them needs nothing more), tokenizer.json
        # tokenizers, saved Hugging Face datasets as inputs
        "hf": ["transformers>=5.24", "tokenizers>=0.15", "pyarrow"],
        "eval": ["lm-eval>=0.4.9"],  # tools/lm_eval.py, megamoe.inference.harness
        "wandb": ["wandb>=0.19"],  # --wandb-project
        "test": ["pytest", "pytest-timeout", "ruff~=0.17.6", "transformers>=5.24", "mambapy", "lm-eval>=0.4.9",
                 "wandb>=0.19", "tokenizers>=0.15", "pyarrow", "datasets"],
    },
    entry_points={
        "console_scripts": [
            "megamoe-train=megamoe.cli.train:main",
            "megamoe-quickstart=megamoe.cli.quickstart:main",
        ]
    },
)

"""The README's main job, shortened: megamoe-quickstart prepares the data, trains on 2 processes with EP 2,
and leaves metrics, plot, checkpoint and a sample where it says."""
import os
import subprocess
import sys

import pytest

from megamoe.logging import read_metrics


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megamoe.cli.quickstart", "--workdir", str(tmp_path),
                          "--train-iters", "20"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for path in ("corpus.jsonl", "tokenizer.model", "data/corpus_text_document.bin", "data/corpus_text_document.idx",
                 "run/metrics.jsonl", "run/loss.png", "run/config.yaml", "run/checkpoints/latest"):
        assert os.path.exists(tmp_path / path), path
    records = [r for r in read_metrics(str(tmp_path / "run")) if "lm_loss" in r]
    assert records[-1]["step"] == 20 and records[-1]["lm_loss"] < records[0]["lm_loss"]
    assert "EP 2" in out.stdout and "sample:" in out.stdout and "valid loss" in out.stdout


@pytest.mark.slow
def test_moe_routing_comparison_runs_and_plots(tmp_path):
    """examples/moe_routing/compare.py on random tokens, 2 steps each: three runs, a table, the plot."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "moe_routing", "compare.py"), "--mock",
                          "--train-iters", "2", "--nproc", "1", "--workdir", str(tmp_path),
                          "--output", str(tmp_path / "routing.png")], capture_output=True, text=True, timeout=600,
                         cwd=root, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout.split("routing ")[-1]
    assert all(name in table for name in ("switch", "bias", "top2+shared"))
    assert os.path.getsize(tmp_path / "routing.png") > 1000
    bias = [r for r in read_metrics(str(tmp_path / "routing" / "bias")) if "lm_loss" in r]
    assert "moe/layers.1.moe/load_max_over_mean" in bias[-1] and bias[-1]["aux_loss"] == 0

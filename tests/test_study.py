"""tools/compare_models.py: a study trains its models, plots them, tabulates numbers that are the runs' own
metrics, and resumes without retraining what finished."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml

from megamoe.cli.study import built_in_models
from megamoe.cli.study import main as study_main
from megamoe.cli.study_report import first_step_at
from megamoe.config import config_from_dict
from megamoe.logging import run_records, smooth
from megamoe.model import count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compare_models.py")


def _study(tmp_path, tiny_corpus, *args):
    cmd = [sys.executable, TOOL, "--workdir", str(tmp_path / "study"), "--base", str(tmp_path / "base.yaml"),
           "--data-path", tiny_corpus["prefix"], "--tokenizer-model", tiny_corpus["tokenizer"], *args]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    out.out = out.stdout
    return out


@pytest.fixture
def base(tmp_path):
    config = {"model": {"d_model": 32, "d_state": 8, "num_experts": 4, "num_heads": 4},
              "data": {"seq_length": 32, "split": "90,10,0"},
              "training": {"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 3,
                           "eval_iters": 1},
              "optimizer": {"lr": 3e-3}, "logging": {"log_interval": 1, "tensorboard": False}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    return config


def test_built_in_models_have_equal_active_size():
    models = built_in_models({"d_model": 128, "num_experts": 8}, blocks=4)
    active = {n: count_parameters(config_from_dict({"model": dict(m, vocab_size=128)}).model)["active_non_embedding"]
              for n, m in models.items()}
    for name in ("transformer", "transformer_moe", "moe_mamba", "dense_twin"):
        assert abs(active[name] / active["mamba"] - 1) < 0.1, (name, active)
    assert models["dense_twin"]["d_ffn"] == 3 * 128 and models["moe_mamba"]["pattern"] == "MEMEMEME"


def test_two_model_study_writes_plot_and_table_then_resumes(tmp_path, tiny_corpus, base):
    # First only Mamba; then the study grows by MoE-Mamba: Mamba is not trained again.
    first = _study(tmp_path, tiny_corpus, "--models", "mamba", "--save-interval", "3")
    assert first.returncode == 0, first.out[-3000:]
    study = tmp_path / "study"
    mamba_metrics = study / "runs" / "mamba" / "metrics.jsonl"
    before = mamba_metrics.read_bytes()
    second = _study(tmp_path, tiny_corpus, "--models", "mamba", "moe_mamba", "--save-interval", "3")
    assert second.returncode == 0, second.out[-3000:]
    assert "mamba: MMMMMMMM" in second.out and "finished earlier" in second.out
    assert mamba_metrics.read_bytes() == before
    assert os.path.getsize(study / "study.png") > 5000

    table = json.loads((study / "study.json").read_text())
    assert table["reference"] == "mamba" and [r["model"] for r in table["models"]] == ["mamba", "moe_mamba"]
    for row in table["models"]:
        records = run_records(str(study / "runs" / row["model"]))
        train = [r for r in records if "lm_loss" in r]
        valid = [r for r in records if "valid_loss" in r]
        assert row["steps"] == train[-1]["step"] == 6
        assert row["final_valid_loss"] == valid[-1]["valid_loss"]
        assert row["final_valid_ppl"] == pytest.approx(math.exp(valid[-1]["valid_loss"]))
        assert row["final_train_loss_smoothed"] == pytest.approx(smooth([r["lm_loss"] for r in train])[-1])
        seconds = sum(r["step_time_s"] for r in train)  # log_interval 1: one record per step
        assert row["train_seconds"] == pytest.approx(seconds)
        assert row["tokens_per_s"] == pytest.approx(4 * 32 / statistics.median(r["step_time_s"] for r in train))
    mamba, moe = table["models"]
    assert mamba["speedup"] == 1.0 and mamba["step_reaching_reference"] == 6
    curve = {"steps": list(range(1, 7)), "smoothed": smooth(
        [r["lm_loss"] for r in run_records(str(study / "runs" / "moe_mamba")) if "lm_loss" in r])}
    step = first_step_at(curve, table["reference_final_loss_smoothed"])
    assert moe["step_reaching_reference"] == step and moe["speedup"] == (6 / step if step else None)
    assert moe["total_params"] > moe["active_params"] and mamba["total_params"] == mamba["active_params"]
    markdown = (study / "study.md").read_text()
    assert f"{moe['final_valid_loss']:.3f}" in markdown and "| moe_mamba | MEMEMEME |" in markdown

    # An interrupted model resumes from its last checkpoint (step 3 of 6), not from the start; here through
    # --launcher, the command a Slurm study gives (srun python -m megamoe.cli.train). A run that stops early and
    # exits 0 (a signal with --exit-signal-handler; here --exit-interval 4) is not taken as finished.
    run = study / "runs" / "moe_mamba"
    marker = json.loads((run / "study.json").read_text())
    (run / "study.json").write_text(json.dumps(dict(marker, finished=False)))
    shutil.rmtree(run / "checkpoints" / "iter_0000006")
    (run / "checkpoints" / "latest").write_text("iter_0000003")
    stopped = _study(tmp_path, tiny_corpus, "--models", "mamba", "moe_mamba", "--save-interval", "3",
                     "--launcher", f"{sys.executable} -m megamoe.cli.train --exit-interval 4")
    assert stopped.returncode == 1 and "moe_mamba stopped early (iter_0000004 of 6 steps)" in stopped.out, \
        stopped.out[-3000:]
    assert "(resuming)" in stopped.out and not json.loads((run / "study.json").read_text())["finished"]
    third = _study(tmp_path, tiny_corpus, "--models", "mamba", "moe_mamba", "--save-interval", "3")
    assert third.returncode == 0, third.out[-3000:]
    assert "(resuming)" in third.out and mamba_metrics.read_bytes() == before
    steps = [r["step"] for r in run_records(str(run)) if "lm_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]

    # Other settings for a trained model: refused, nothing removed, unless --restart.
    changed = _study(tmp_path, tiny_corpus, "--models", "mamba", "--train-iters", "4")
    assert changed.returncode == 2 and "--restart" in changed.out and mamba_metrics.read_bytes() == before


def test_bad_input_is_one_line_error(tmp_path, tiny_corpus, base, capsys):
    common = ["--workdir", str(tmp_path / "study"), "--base", str(tmp_path / "base.yaml"),
              "--data-path", tiny_corpus["prefix"], "--tokenizer-model", tiny_corpus["tokenizer"]]
    for args, message in ((["--models", "mamba", "gpt5"], "gpt5: not a built-in model"),
                          (["--models", "mamba", "--sweep", "num_experts"], "KEY=V1,V2"),
                          (["--models", "mamba", "moe_mamba", "--sweep", "model.bogus=1,2"], "bogus"),
                          (["--models", "mamba", "--reference", "moe_mamba"], "--reference moe_mamba")):
        assert study_main(common + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("compare_models: error:") and message in err and err.count("\n") == 1, err

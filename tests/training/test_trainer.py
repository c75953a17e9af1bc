"""The training loop: loss falls, gradient accumulation, bf16, metrics files, clear errors, a 2-process EP run."""
import math
import os
import subprocess
import sys

import pytest
import torch

from megamoe.config import build_config, config_from_dict
from megamoe.logging import read_metrics
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import run_on_ranks
from megamoe.training import make_runner, train, train_step
from megamoe.training.optimizer import build_optimizer

TINY_MODEL = {"pattern": "MEME", "d_model": 64, "d_state": 8, "num_experts": 4}


def _tiny(corpus, tmp_path, **sections):
    base = {"model": dict(TINY_MODEL),
            "data": {"data_path": [corpus["prefix"]], "tokenizer_model": corpus["tokenizer"], "seq_length": 64,
                     "split": "80,20,0"},
            "training": {"train_iters": 40, "micro_batch_size": 4, "global_batch_size": 8, "eval_interval": 20,
                         "eval_iters": 2},
            "optimizer": {"lr": 3e-3, "lr_warmup_iters": 4},
            "logging": {"log_dir": str(tmp_path / "run"), "log_interval": 5, "peak_tflops": 1.0}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base)


def test_tiny_run_loss_falls_and_writes_metrics(tiny_corpus, tmp_path, quiet_env):
    try:
        summary = train(_tiny(tiny_corpus, tmp_path))
    finally:
        destroy_distributed()
    records = read_metrics(summary["metrics"])
    assert [r["step"] for r in records if "lm_loss" in r][-1] == 40
    first, last = records[0], records[-1]
    assert last["lm_loss"] < first["lm_loss"] - 0.75, (first["lm_loss"], last["lm_loss"])
    for key in ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                "consumed_samples", "fraction_dropped", "expert_load_max_over_mean", "mfu", "peak_mem_gb"):
        assert key in last, key
    assert 0.05 < last["peak_mem_gb"] < 24  # this process's RSS: the interpreter and torch are above 50 MB
    assert 0 < last["mfu"] < 1  # against a 1 TFLOP/s peak
    # 2 MoE layers x 8 x 64 tokens per step, top-1: every assignment counted once (before dropping)
    assert len(last["tokens_per_expert"]) == 4 and sum(last["tokens_per_expert"]) == 2 * 8 * 64
    assert last["consumed_samples"] == 40 * 8
    valid = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in valid] == [20, 40] and valid[-1]["valid_loss"] < valid[0]["valid_loss"] + 0.5
    assert os.path.getsize(summary["plot"]) > 1000
    assert os.listdir(os.path.join(summary["log_dir"], "tensorboard"))
    assert "model:" in open(os.path.join(summary["log_dir"], "config.yaml")).read()


def test_bf16_run_finishes_finite(tiny_corpus, tmp_path, quiet_env):
    cfg = _tiny(tiny_corpus, tmp_path, training={"train_iters": 4, "bf16": True, "eval_interval": 4})
    try:
        summary = train(cfg)
    finally:
        destroy_distributed()
    final = summary["final"]
    assert math.isfinite(final["loss"]) and math.isfinite(final["grad_norm"]) and math.isfinite(final["valid_loss"])


def _grads_after_one_step(micro_batch_size, tokens):
    """Gradients of one optimizer step over `tokens` split into micro-batches of `micro_batch_size`."""
    cfg = config_from_dict({
        "model": {**TINY_MODEL, "pattern": "MEAF", "vocab_size": 128, "capacity_factor": 0,
                  "load_balancing_weight": 0.0, "num_heads": 4},
        "data": {"mock": True, "seq_length": tokens.shape[1] - 1},
        "training": {"micro_batch_size": micro_batch_size, "global_batch_size": tokens.shape[0]},
        "optimizer": {"clip_grad": 0.0}})
    topo = init_distributed(cfg.parallel)
    try:
        set_seed(0)
        model = build_parallel_model(cfg, topo)
        batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(t.shape[0], t.shape[1] - 1))
                   for t in tokens.split(micro_batch_size)]
        record = train_step(make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device),
                            batches, cfg, topo, lr=0.0)
        return record["lm_loss"], {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        destroy_distributed()


def test_gradient_accumulation_equals_one_larger_batch(quiet_env):
    """Without capacity drops or a per-batch load-balancing term, k micro-batches of m samples give the
    gradient of one batch of k x m samples."""
    tokens = torch.randint(0, 128, (8, 17), generator=torch.Generator().manual_seed(0))
    loss_4x2, grads_4x2 = _grads_after_one_step(2, tokens)
    loss_1x8, grads_1x8 = _grads_after_one_step(8, tokens)
    assert loss_4x2 == pytest.approx(loss_1x8, rel=1e-6)
    for name, g in grads_1x8.items():
        torch.testing.assert_close(grads_4x2[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "megamoe.cli.train", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_bad_config_and_missing_data_fail_with_one_line(tmp_path):
    out = _cli("--data-path", str(tmp_path / "nothing_text_document"), "--tokenizer-model", "tok.model")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nothing_text_document.bin does not exist" in out.stderr
    # As rank 0 of a 2-process torchrun job: the check runs before any rendezvous.
    out = _cli("--data.mock", "true", "--model.num_experts", "3", "--expert-model-parallel-size", "2",
               RANK="0", WORLD_SIZE="2")
    assert out.returncode == 2 and "num_experts=3 is not divisible by --expert-model-parallel-size=2" in out.stderr
    out = _cli("--data.mock", "true", "--model.d_modle", "3")
    assert out.returncode == 2 and "did you mean model.d_model" in out.stderr


def test_mismatched_tokenizer_fails_before_training(tiny_corpus, tmp_path):
    from megamoe.data import train_tokenizer
    other = train_tokenizer([os.path.join(tiny_corpus["folder"], "corpus.jsonl")], str(tmp_path / "other"), 700)
    out = _cli("--data-path", tiny_corpus["prefix"], "--tokenizer-model", other, "--train-iters", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "tokenizer" in out.stderr


def test_print_params_of_a_paper_config():
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    out = _cli("--config", os.path.join(root, "examples", "paper", "moe_mamba_25m.yaml"), "--print-params",
               "--model.vocab_size", "50257")
    assert out.returncode == 0, out.stderr
    assert "542.2M" in out.stdout and "26.3M" in out.stdout


def test_print_params_counts_the_vocabulary_training_builds(tiny_corpus, tmp_path):
    """A 700-piece tokenizer: training pads the vocabulary to 768 (a multiple of 128 x TP 2), and so does
    --print-params (it used to count 700 rows of embedding)."""
    from megamoe.config import ModelConfig
    from megamoe.data import train_tokenizer
    from megamoe.model import count_parameters
    tok = train_tokenizer([os.path.join(tiny_corpus["folder"], "corpus.jsonl")], str(tmp_path / "tok700"), 700)
    out = _cli("--model.pattern", "MEME", "--model.d_model", "64", "--tokenizer-model", tok,
               "--tensor-model-parallel-size", "2", "--print-params")
    assert out.returncode == 0, out.stderr
    assert "vocab 768" in out.stdout
    total = count_parameters(ModelConfig(pattern="MEME", d_model=64, vocab_size=768))["total"]
    assert f"{total / 1e6:>9.1f}M" in out.stdout.splitlines()[-1]


@pytest.mark.slow
def test_two_process_expert_parallel_quickstart_config_trains(tiny_corpus, tmp_path):
    """The quickstart's model on 2 gloo processes with expert parallel 2 (torchrun), loss falling."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    cfg = build_config(os.path.join(root, "megamoe", "configs", "quickstart.yaml"))
    assert cfg.model.pattern.count("E") >= 2
    run = tmp_path / "ep2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megamoe.cli.train", "--config", os.path.join(root, "megamoe", "configs", "quickstart.yaml"),
           "--data-path", tiny_corpus["prefix"], "--tokenizer-model", tiny_corpus["tokenizer"],
           "--expert-model-parallel-size", "2", "--train-iters", "30", "--seq-length", "64",
           "--eval-interval", "30", "--logging.log_dir", str(run), "--log-interval", "5", "--split", "80,20,0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "EP 2" in out.stdout
    records = [r for r in read_metrics(str(run)) if "lm_loss" in r]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 1.0


def test_finetune_starts_from_the_weights_at_step_zero(tiny_corpus, tmp_path, quiet_env):
    try:
        pretrained = train(_tiny(tiny_corpus, tmp_path / "pre", training={"train_iters": 30, "eval_interval": 0},
                                 checkpoint={"save": str(tmp_path / "pre" / "ckpt")}))
        destroy_distributed()
        summary = train(_tiny(tiny_corpus, tmp_path / "fine", training={"train_iters": 3, "eval_interval": 0},
                              checkpoint={"load": str(tmp_path / "pre" / "ckpt"), "finetune": True},
                              logging={"log_interval": 1}))
    finally:
        destroy_distributed()
    first_pre = read_metrics(pretrained["metrics"])[0]
    records = read_metrics(summary["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["consumed_samples"] == 8
    # The first step already has the pretrained model's loss, far below a new model's (about ln 1024 = 6.9).
    assert records[0]["lm_loss"] < first_pre["lm_loss"] - 1.0
    assert records[0]["lm_loss"] < pretrained["final"]["lm_loss"] + 0.5


def test_no_load_optim_resumes_a_model_only_checkpoint(tmp_path, quiet_env):
    from megamoe import checkpoint
    from megamoe.checkpoint import CheckpointError
    from megamoe.model import build_model
    from megamoe.training import TrainState

    cfg = config_from_dict({"model": dict(TINY_MODEL, vocab_size=64), "data": {"mock": True, "seq_length": 32},
                            "training": {"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 2,
                                         "eval_interval": 0},
                            "checkpoint": {"load": str(tmp_path / "weights")},
                            "logging": {"log_dir": str(tmp_path / "run"), "log_interval": 1}})
    # model only, as an export or another framework's conversion gives
    checkpoint.save(str(tmp_path / "weights"), build_model(cfg.model), None,
                    TrainState(step=4, consumed_train_samples=8), cfg, None)
    try:
        with pytest.raises(CheckpointError, match="holds no optimizer state .* add --no-load-optim"):
            train(cfg)
        destroy_distributed()
        cfg.checkpoint.no_load_optim = True
        records = read_metrics(train(cfg)["metrics"])
    finally:
        destroy_distributed()
    assert [(r["step"], r["consumed_samples"]) for r in records] == [(5, 10), (6, 12)]


def _logged_peak_memory(tmp_path, ballast_gb):
    from megamoe.logging import Progress
    from megamoe.training.metrics import RunLogger, peak_memory_gb
    cfg = config_from_dict({"model": dict(TINY_MODEL, vocab_size=64), "data": {"mock": True},
                            "logging": {"log_dir": str(tmp_path), "tensorboard": False}})
    topo = init_distributed(cfg.parallel)
    try:
        if topo.rank == 1:
            ballast = torch.ones(int(ballast_gb * 2 ** 28))  # touched: this rank's peak is the highest  # noqa: F841
        logger = RunLogger(str(tmp_path), cfg, {"active_non_embedding": 1}, topo)
        logger.log({"step": 1, "loss": 1.0, "tokens_per_s": 1.0}, Progress(1))
        logger.close()
        return peak_memory_gb(topo.device)
    finally:
        destroy_distributed()


def test_logged_peak_memory_is_the_highest_of_any_rank(tmp_path):
    from megamoe.training.metrics import peak_memory_gb
    # A rank starts from the peak RSS of the process that launched it (Linux keeps it across exec): this one's.
    ballast_gb = peak_memory_gb(torch.device("cpu")) + 0.5
    own = run_on_ranks(_logged_peak_memory, 2, args=(tmp_path, ballast_gb))
    logged = read_metrics(str(tmp_path))[-1]["peak_mem_gb"]
    assert own[1] > own[0] + 0.4 and logged == pytest.approx(max(own), rel=0.02)

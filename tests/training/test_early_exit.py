"""Clean early exits (Megatron's --exit-signal-handler, --exit-interval, --exit-duration-in-mins): the run
saves a checkpoint at the step it stops, exits 0, and --load goes on from there; all ranks stop together."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from megamoe import checkpoint
from megamoe.config import ConfigError, config_from_dict
from megamoe.parallel import destroy_distributed, init_distributed
from megamoe.testing import run_on_ranks
from megamoe.training import train
from megamoe.training.early_exit import EarlyExit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["--model.pattern", "MEME", "--model.d_model", "32", "--model.d_state", "8", "--model.num_experts", "4",
         "--model.vocab_size", "64", "--data.mock", "true", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--eval-interval", "0", "--log-interval", "1"]


def _config(tmp_path, **training):
    return config_from_dict({
        "model": {"pattern": "MEME", "d_model": 32, "d_state": 8, "num_experts": 4, "vocab_size": 64},
        "data": {"mock": True, "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 2, "eval_interval": 0, **training},
        "checkpoint": {"save": str(tmp_path / "ckpt")},
        "logging": {"log_dir": str(tmp_path / "run"), "log_interval": 1}})


def test_exit_interval_saves_and_resume_goes_on(tmp_path, quiet_env):
    try:
        summary = train(_config(tmp_path, train_iters=10, exit_interval=3))
        assert (summary["step"], summary["stopped"]) == (3, "--exit-interval 3")
        assert checkpoint.resolve(str(tmp_path / "ckpt")).endswith("iter_0000003")
        destroy_distributed()
        cfg = _config(tmp_path, train_iters=5)
        cfg.checkpoint.load = str(tmp_path / "ckpt")
        summary = train(cfg)
        assert (summary["step"], summary["stopped"]) == (5, None)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, workers):
    """What Slurm's `--signal=TERM@120` does before it kills a job: SIGTERM to every process of the job,
    DataLoader workers included (their death must not fail the run before it saves)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "megamoe.cli.train", *MODEL, "--train-iters", "100000",
                             "--exit-signal-handler", "--save", str(tmp_path / "ckpt"), "--data.num_workers",
                             str(workers), "--logging.log_dir", str(tmp_path / "run")], start_new_session=True,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as Slurm signals the job step
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received (--exit-signal-handler)" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert checkpoint.resolve(str(tmp_path / "ckpt")).endswith(f"iter_{steps[-1]:07d}")


def _stop_reason_when_rank_1_is_signalled(tmp_path):
    cfg = _config(tmp_path, exit_signal_handler=True)
    topo = init_distributed(cfg.parallel)
    with EarlyExit(cfg, topo, time.monotonic()) as early_exit:
        if topo.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on
            time.sleep(0.1)
        return early_exit.reason(step=7)


def test_every_rank_stops_when_one_is_signalled(tmp_path):
    assert run_on_ranks(_stop_reason_when_rank_1_is_signalled, 2, args=(tmp_path,)) == [
        "SIGTERM received (--exit-signal-handler)"] * 2


@pytest.mark.parametrize("training, save, message", [
    ({"exit_signal_handler": True}, False, "--exit-signal-handler stops the run early .* give --save DIR"),
    ({"exit_interval": 0}, True, "--exit-interval=0 must be >= 1"),
    ({"exit_duration_in_mins": -1.0}, True, "--exit-duration-in-mins=-1.0 must be > 0"),
])
def test_bad_exit_options(tmp_path, training, save, message):
    cfg = _config(tmp_path, **training)
    if not save:
        cfg.checkpoint.save = None
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1)


def test_signal_handler_is_restored_and_needs_the_main_thread(tmp_path):
    cfg = _config(tmp_path, exit_signal_handler=True)
    topo = types.SimpleNamespace(device=torch.device("cpu"))
    before = signal.getsignal(signal.SIGTERM)
    with EarlyExit(cfg, topo, time.monotonic()):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(ConfigError, EarlyExit, cfg, topo, 0.0)))
    thread.start()
    thread.join()
    assert "only on the main thread" in str(errors[0].value)

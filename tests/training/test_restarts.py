"""Jobs that come back by themselves: a rank killed under `torchrun --max-restarts 1`, also while an async save is
in flight, and a requeued Slurm job; each finishes with exactly the losses of an uninterrupted run (fp32, EP 2).
`--load X --save X` starts a run when X holds nothing yet; a hung rank makes the others exit within the heartbeat
timeout, naming it. Faults are injected by tests/faults.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megamoe import checkpoint
from megamoe.logging import read_metrics
from megamoe.parallel.topology import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["--model.pattern", "MEME", "--model.d_model", "32", "--model.d_state", "8", "--model.num_experts", "4",
         "--model.vocab_size", "64", "--data.mock", "true", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--eval-interval", "0", "--log-interval", "1", "--train-iters", "24",
         "--expert-model-parallel-size", "2", "--save-interval", "5"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RESTART_COUNT")


def _env(faults=(), **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return dict(env, OMP_NUM_THREADS="1", MEGAMOE_TEST_FAULTS=json.dumps(list(faults)), **extra)


def torchrun(tmp_path, name, *args, faults=(), restarts=0, timeout=300):
    """A 2-process torchrun job with --save X --load X; (completed process, per-step losses: the last logged
    record of each step, as a restarted job logs the steps after its checkpoint again)."""
    run = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "tests.faults", *MODEL, "--save", str(run / "ckpt"),
           "--load", str(run / "ckpt"), "--logging.log_dir", str(run), *args]
    out = subprocess.run(cmd, cwd=REPO, env=_env(faults), capture_output=True, text=True, timeout=timeout)
    return out, _losses(run)


def _losses(run) -> dict:
    if not (run / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(str(run))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    out, losses = torchrun(folder, "run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no checkpoint there yet; starting from scratch" in out.stdout  # --load X --save X, X empty
    assert sorted(losses) == list(range(1, 25))
    last = read_metrics(str(folder / "run"))[-1]  # the per-rank step times
    assert last["slowest_rank"] in (0, 1) and 0 < last["fwd_bwd_min_s"] <= last["fwd_bwd_max_s"]
    assert "fwd-bwd per rank" in out.stdout
    return losses


@pytest.mark.slow
def test_a_killed_rank_restarts_and_the_job_finishes_with_the_same_losses(tmp_path, uninterrupted):
    out, losses = torchrun(tmp_path, "killed", faults=[{"kind": "kill", "rank": 1, "step": 13}], restarts=1)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "iter_0000010" in out.stdout  # the newest complete checkpoint
    assert losses == uninterrupted  # bit-exact, step by step


@pytest.mark.slow
def test_a_kill_during_an_async_save_restarts_from_the_save_before(tmp_path, uninterrupted):
    out, losses = torchrun(tmp_path, "async", "--async-save",
                           faults=[{"kind": "kill_in_async_save", "rank": 1, "step": 15}], restarts=1)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "iter_0000010 at step 10" in out.stdout  # step 15's save never completed
    assert losses == uninterrupted
    assert checkpoint.resolve(str(tmp_path / "async" / "ckpt")).endswith("iter_0000024")


def _srun(tmp_path, name, faults=()):
    """The job as Slurm starts its tasks (SLURM_PROCID, no torchrun), each task run again on a requeue."""
    run, port = tmp_path / name, free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.faults", *MODEL, "--save", str(run / "ckpt"), "--load",
                               str(run / "ckpt"), "--logging.log_dir", str(run),
                               "--parallel.heartbeat_timeout_seconds", "4"], cwd=REPO,
                              env=_env(faults, SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    return procs, run


@pytest.mark.slow
def test_a_hung_rank_is_named_and_a_requeued_slurm_job_resumes(tmp_path, uninterrupted):
    procs, run = _srun(tmp_path, "slurm", faults=[{"kind": "stop", "rank": 1, "step": 12}])
    try:
        start = time.monotonic()
        out0, _ = procs[0].communicate(timeout=120)  # rank 0 waits in a collective for the stopped rank 1
        waited = time.monotonic() - start
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 1, out0[-3000:]
    assert "rank 1 (host" in out0 and "stopped answering" in out0 and "exiting (status 1)" in out0
    assert waited < 60  # the 4 s heartbeat, not the 30-minute collective timeout
    procs, run = _srun(tmp_path, "slurm")  # requeued: the same command again, on fresh processes
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "resumed from" in outs[0] and _losses(run) == uninterrupted


def test_load_alone_must_hold_a_checkpoint(tmp_path):
    base = [sys.executable, "-m", "megamoe.cli.train", *MODEL, "--expert-model-parallel-size", "1",
            "--train-iters", "1"]
    out = subprocess.run(base + ["--load", str(tmp_path / "typo")], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--load: " in out.stderr and "typo does not exist (a typo?)" in out.stderr
    (tmp_path / "empty").mkdir()
    out = subprocess.run(base + ["--load", str(tmp_path / "empty")], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "empty holds no checkpoint" in out.stderr

"""Steps that go wrong and conditions that would lose work, each a clear report and nothing lost: a NaN in one
expert of rank 1 traced to its layer, expert and rank and skipped, or the run stopped; a loss spike reported
with its micro-batches and its re-run's verdict; a full disk during a save, a --save that cannot be written, a
rank started on other data. Faults are injected by tests/faults.py; ranks start as Slurm starts them."""
import json
import os
import subprocess
import sys

import torch

from megamoe import checkpoint
from megamoe.checkpoint.convert import read_tensors
from megamoe.logging import read_metrics
from megamoe.parallel.topology import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["--model.pattern", "MEME", "--model.d_model", "32", "--model.d_state", "8", "--model.num_experts", "4",
         "--model.vocab_size", "64", "--data.mock", "true", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--eval-interval", "0", "--log-interval", "1"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RESTART_COUNT")


def _ranks(args, faults=(), world=2, per_rank=None, timeout=240):
    """megamoe-train (with faults) on `world` processes started as srun starts them; [(returncode, output)].
    per_rank(r): extra arguments of rank r."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", MEGAMOE_TEST_FAULTS=json.dumps(list(faults)), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), SLURM_NTASKS=str(world))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.faults", *MODEL, *args, *(per_rank(r) if per_rank else [])],
                              cwd=REPO, env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_a_nan_in_one_expert_is_traced_skipped_and_the_weights_kept(tmp_path):
    nan = {"kind": "nan", "rank": 1, "steps": [3], "layer": 1, "expert": 3}
    (rc0, out0), (rc1, _) = _ranks(["--train-iters", "5", "--expert-model-parallel-size", "2", "--save-interval",
                                    "1", "--save", str(tmp_path / "ckpt"), "--logging.log_dir", str(tmp_path)],
                                   faults=[nan])
    assert (rc0, rc1) == (0, 0), out0[-3000:]
    assert ("step 3: non-finite loss or gradient, step skipped (1 in a row, at most 3); first non-finite: forward "
            "output of layers.1.moe.experts (expert 3) in micro-batch 0 on rank 1") in out0
    records = read_metrics(str(tmp_path))
    assert [r.get("nonfinite_steps", 0) for r in records] == [0, 0, 1, 0, 0]
    assert [r["lr"] for r in records][2:4] == [records[2]["lr"]] * 2  # the LR schedule waits for the update
    for part in ("model.", "optimizer.state."):  # weights and optimizer untouched by step 3 ...
        before, skipped = (read_tensors(str(tmp_path / "ckpt" / f"iter_000000{s}"), part) for s in (2, 3))
        assert all(torch.equal(before[k], skipped[k]) for k in before), part
    assert checkpoint.read_marker(str(tmp_path / "ckpt" / "iter_0000003"))["train_state"][
        "consumed_train_samples"] == 12  # ... while the data moved on
    before, after = (read_tensors(str(tmp_path / "ckpt" / f"iter_000000{s}")) for s in (3, 4))
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_nans_beyond_the_limit_stop_the_run_with_one_line_and_the_last_good_checkpoint(tmp_path):
    nan = {"kind": "nan", "rank": 1, "steps": [4, 5, 6, 7], "layer": 1, "expert": 2}
    results = _ranks(["--train-iters", "10", "--expert-model-parallel-size", "2", "--save-interval", "2",
                      "--training.max_nonfinite_skips", "1", "--save", str(tmp_path / "ckpt")], faults=[nan])
    for rc, out in results:
        assert rc == 2 and "Traceback" not in out, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("megamoe-train: error:")]
        assert len(errors) == 1 and "step 5: a non-finite loss or gradient for 2 steps in a row" in errors[0]
        assert "layers.1.moe.experts (expert 2)" in errors[0] and "iter_0000004" in errors[0]
    assert checkpoint.resolve(str(tmp_path / "ckpt")).endswith("iter_0000004")  # not overwritten: step 4 saved
    assert read_metrics(str(tmp_path / "ckpt"))[-1]["step"] == 4  # step 5 stopped the run before its record


def _spike(tmp_path, calls):
    spike = {"kind": "spike", "step": 8, "scale": 40.0, "calls": calls}
    [(rc, out)] = _ranks(["--train-iters", "9", "--check-for-spiky-loss", "--training.spiky_loss_factor", "2",
                          "--rerun-mode", "validate_results", "--logging.log_dir", str(tmp_path)], faults=[spike],
                         world=1)
    assert rc == 0, out[-3000:]
    return [line for line in out.splitlines() if "loss spike" in line]


def test_a_loss_spike_is_reported_with_its_micro_batches_and_the_rerun_verdict(tmp_path):
    [line] = _spike(tmp_path / "deterministic", calls=None)  # every pass of step 8: the data's fault
    assert line.startswith("[megamoe] step 8: loss spike: loss ") and "x the mean of the last 7 steps" in line
    assert "(samples 28-29)" in line and "(samples 30-31)" in line  # step 8's two micro-batches
    assert "re-run: the same loss again (deterministic" in line
    [line] = _spike(tmp_path / "transient", calls=2)  # the first pass only: a fault that does not come back
    assert "re-run: loss" in line and "this time (transient" in line
    records = read_metrics(str(tmp_path / "transient"))
    assert records[7]["loss"] < 2 * records[6]["loss"]  # the step applied the re-run's gradients and loss record


def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_last_checkpoint(tmp_path):
    [(rc, out)] = _ranks(["--train-iters", "6", "--save-interval", "2", "--save", str(tmp_path / "ckpt")],
                         faults=[{"kind": "disk_full", "step": 4}], world=1)
    errors = [line for line in out.splitlines() if line.startswith("megamoe-train: error:")]
    assert rc == 2 and "Traceback" not in out and len(errors) == 1, out[-3000:]
    assert "No space left on device" in errors[0] and "iter_0000002 is intact" in errors[0]
    saves = sorted(d for d in os.listdir(tmp_path / "ckpt") if d.startswith(("iter_", ".tmp_")))
    assert saves == ["iter_0000002"]  # the failed save's temporary folder is gone
    assert checkpoint.read_marker(str(tmp_path / "ckpt"))["step"] == 2


def test_an_unwritable_save_and_a_rank_on_other_data_stop_before_training(tmp_path, tiny_corpus):
    (tmp_path / "file").write_text("")
    [(rc, out)] = _ranks(["--save", str(tmp_path / "file" / "ckpt")], world=1)
    assert rc == 2 and "Traceback" not in out and "is not a writable folder" in out, out[-3000:]

    other = tmp_path / "copy"  # the same data under another name, as a node with another mount would have it
    other.mkdir()
    for ext in (".bin", ".idx", ".json"):
        (other / f"corpus{ext}").write_bytes(open(tiny_corpus["prefix"] + ext, "rb").read())
    paths = [tiny_corpus["prefix"], str(other / "corpus")]
    results = _ranks(["--data.mock", "false", "--tokenizer-model", tiny_corpus["tokenizer"], "--train-iters", "1",
                      "--model.vocab_size", "1024", "--split", "80,20,0"],
                     per_rank=lambda r: ["--data-path", paths[r]])
    for rc, out in results:
        assert rc == 2 and "Traceback" not in out, out[-3000:]
        assert "rank 1 does not run what rank 0 runs: data.data_path" in out

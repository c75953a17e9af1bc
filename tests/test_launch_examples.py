"""The launch scripts in examples/launch start a 2-process expert-parallel run that trains and exits 0, as a user
runs them: torchrun on one node, mpirun with the MPI that `megamoe[mpi]` installs, and the Slurm batch script
under a stand-in `srun` / `scontrol` that start tasks as Slurm documents (SLURM_PROCID, SLURM_NTASKS, ...)."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from megamoe.parallel.topology import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "examples", "launch")
MODEL = ["--model.pattern", "MEME", "--model.d_model", "32", "--model.d_state", "8", "--model.num_experts", "4",
         "--model.vocab_size", "64", "--data.mock", "true", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--eval-interval", "0", "--log-interval", "1", "--train-iters", "3",
         "--expert-model-parallel-size", "2"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for Slurm's srun on one node: start SLURM_NTASKS copies of the command, as srun does.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS_PER_NODE=$SLURM_NTASKS "$@" & pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def _run(cmd, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    bin_dir = os.path.dirname(sys.executable)  # `python` in the scripts is this interpreter
    base["PATH"] = os.pathsep.join([bin_dir, *env.pop("extra_path", []), base.get("PATH", "")])
    run_dir = tmp_path / "run"
    out = subprocess.run([*cmd, *MODEL, "--logging.log_dir", str(run_dir)], cwd=REPO, capture_output=True,
                         text=True, timeout=240, env={**base, **env})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses), steps
    assert "expert_model_parallel_size: 2" in (run_dir / "config.yaml").read_text()
    return out


def test_torchrun_multinode_script_on_one_node(tmp_path):
    _run(["bash", os.path.join(LAUNCH, "torchrun_multinode.sh")], tmp_path, NNODES="1", NODE_RANK="0",
         GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("mpirun") is None, reason="needs mpirun: pip install megamoe[mpi]")
def test_mpirun_script(tmp_path):
    _run(["bash", os.path.join(LAUNCH, "mpirun.sh")], tmp_path, NP="2")


def test_slurm_script_under_a_stand_in_srun(tmp_path):
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")  # show hostnames: the first node
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(stat.S_IRWXU)
    _run(["bash", os.path.join(LAUNCH, "slurm.sbatch")], tmp_path, extra_path=[str(fake)], SLURM_NTASKS="2",
         SLURM_JOB_NODELIST="node001", MASTER_PORT=str(free_port()))

"""Start-up under mpirun: rank, world size, local rank and the rendezvous come from MPI (mpi4py)."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import torch, torch.distributed as dist
    from megamoe.config import ParallelConfig
    from megamoe.parallel import destroy_distributed, init_distributed
    topo = init_distributed(ParallelConfig(expert_model_parallel_size=2))
    t = torch.tensor([topo.rank + 1.0])
    dist.all_reduce(t)
    print(f"rank={topo.rank} launcher={topo.env.launcher} local={topo.env.local_rank} "
          f"ep_rank={topo.ep_rank} sum={t.item()}", flush=True)
    destroy_distributed()
""")


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec: pip install megamoe[mpi]")
def test_mpirun_two_ranks(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    # mpiexec forwards both ranks' stdout into one stream, where their lines may run together.
    lines = sorted(re.findall(r"rank=\d launcher=\w+ local=\d ep_rank=\d sum=[\d.]+", out.stdout))
    assert lines == ["rank=0 launcher=mpi local=0 ep_rank=0 sum=3.0", "rank=1 launcher=mpi local=1 ep_rank=1 sum=3.0"]

"""Distributed start-up: groups and ranks from torchrun's environment, on gloo, for several layouts."""
import pytest
import torch
import torch.distributed as dist

from megamoe.config import ParallelConfig
from megamoe.parallel import destroy_distributed, detect_launch_env, init_distributed
from megamoe.testing import RankFailure, run_on_ranks


def _layout(tp, pp, ep):
    topo = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                           expert_model_parallel_size=ep))
    # A collective on every group proves the groups exist and connect the right ranks.
    sums = {}
    for name in ("tp", "pp", "dp", "ep", "edp"):
        t = torch.tensor([float(topo.rank)])
        dist.all_reduce(t, group=getattr(topo, f"{name}_group"))
        sums[name] = t.item()
    return dict(rank=topo.rank, backend=topo.backend, tp_rank=topo.tp_rank, pp_rank=topo.pp_rank,
                dp_rank=topo.dp_rank, ep_rank=topo.ep_rank, dp=topo.dp, edp=topo.edp, sums=sums,
                first=topo.is_first_stage, last=topo.is_last_stage)


def test_single_process_needs_no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert detect_launch_env().launcher == "single"
    topo = init_distributed(ParallelConfig())
    try:
        assert (topo.world_size, topo.tp, topo.dp, topo.backend) == (1, 1, 1, "gloo")
        assert topo.is_first_stage and topo.is_last_stage
    finally:
        destroy_distributed()


def test_tp2_dp2_groups_on_four_gloo_ranks():
    out = run_on_ranks(_layout, 4, args=(2, 1, 2))
    assert [o["tp_rank"] for o in out] == [0, 1, 0, 1]  # TP is the fastest-varying dimension (Megatron order)
    assert [o["dp_rank"] for o in out] == [0, 0, 1, 1]
    assert all(o["backend"] == "gloo" and o["dp"] == 2 for o in out)
    assert [o["sums"]["tp"] for o in out] == [1, 1, 5, 5]  # ranks {0,1} and {2,3}
    assert [o["sums"]["dp"] for o in out] == [2, 4, 2, 4]  # ranks {0,2} and {1,3}
    # Experts: EP 2 over the data-parallel ranks with ETP = TP = 2, so expert-DP is 1.
    assert [o["ep_rank"] for o in out] == [0, 0, 1, 1] and all(o["edp"] == 1 for o in out)


def test_pp2_stages():
    out = run_on_ranks(_layout, 2, args=(1, 2, 1))
    assert [(o["pp_rank"], o["first"], o["last"]) for o in out] == [(0, True, False), (1, False, True)]
    assert [o["sums"]["pp"] for o in out] == [1, 1]


def _fail_on_rank_one():
    import os
    if os.environ["RANK"] == "1":
        raise ValueError("boom on purpose")
    return "ok"


def test_harness_shows_the_failing_rank_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        run_on_ranks(_fail_on_rank_one, 2)


def _hang():
    import time
    time.sleep(60)


def test_harness_times_out():
    with pytest.raises(RankFailure, match="did not finish within 5 s"):
        run_on_ranks(_hang, 2, timeout=5)


def test_srun_without_mpi_reads_slurm_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        detect_launch_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    env = detect_launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.launcher) == \
        (5, 8, 1, 4, "node0", "slurm")


def test_cuda_rng_state_of_this_device_only(monkeypatch):
    """Checkpoints keep this rank's CUDA generator only; older ones kept every visible device's (a list)."""
    from megamoe.parallel.random import get_rng_state, set_rng_state
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    state = get_rng_state()
    assert int(state["cuda"][0]) == 7
    set_rng_state(state)
    set_rng_state(dict(state, cuda=[torch.tensor([3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)]))
    assert restored == [7, 4]

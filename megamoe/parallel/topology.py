"""Distributed start-up in one place, and the one object that owns the topology.

`init_distributed(parallel_cfg)` reads the launcher's environment (torchrun, or mpirun/srun through
mpi4py, or nothing for a single process), starts torch.distributed (NCCL with CUDA, gloo without)
and megatron-core's `parallel_state` groups, and returns a `Topology`. Nothing else in megamoe
creates process groups; everything else asks the Topology.
"""
from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megamoe.config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as the launcher said."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | mpi | slurm | single


def free_port() -> int:
    """A TCP port no process listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_env() -> Optional[LaunchEnv]:
    """Rank and rendezvous from MPI (mpirun / srun --mpi): rank 0's host and a port are broadcast."""
    mpi_markers = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if not any(k in os.environ for k in mpi_markers):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1:
            raise RuntimeError("launched by an MPI launcher but mpi4py is not installed; "
                               "`pip install megamoe[mpi]` or launch with torchrun") from None
        return None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr, port = None, None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = int(os.environ.get("MASTER_PORT") or free_port())
    addr, port = comm.bcast((addr, port), root=0)
    env = LaunchEnv(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), addr, port, "mpi")
    local.Free()
    return env


def _slurm_env() -> Optional[LaunchEnv]:
    """`srun` with one task per process and no MPI: ranks from Slurm, rendezvous from MASTER_ADDR/PORT."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return None
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("launched by srun with several tasks: export MASTER_ADDR (the first node, e.g. "
                           "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) and MASTER_PORT")
    return LaunchEnv(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                     int(os.environ.get("SLURM_LOCALID", 0)),
                     int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
                     os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", 29500)), "slurm")


def detect_launch_env() -> LaunchEnv:
    """torchrun's variables first, then MPI (mpirun, srun --mpi), then srun alone, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return LaunchEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                         int(os.environ.get("LOCAL_RANK", 0)),
                         int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
                         os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)),
                         "torchrun")
    return _mpi_env() or _slurm_env() or LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")


def attempt() -> str:
    """This launch attempt: torchrun's restart count (0 for the first start, and for every other launcher)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def store_client(env: LaunchEnv, timeout: datetime.timedelta, host: bool = False) -> dist.Store:
    """A connection to the job's rendezvous store, its keys under this attempt's prefix. The store is held by
    torchrun's agent (TORCHELASTIC_USE_AGENT_STORE) or, for other launchers, by rank 0 (`host`)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host and not agent,
                          timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"megamoe/attempt_{attempt()}/", store)


def rendezvous_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The store the process groups rendezvous in. torchrun's agent keeps its store across elastic restarts, so
    without a prefix per attempt the first attempt's keys (every rank's address under each group's name) are
    still there when the restarted workers build the same groups, and a new rank dials a dead one ("Gloo
    connectFullMesh failed ... Connection refused"; pytorch#167288 under NCCL)."""
    return store_client(env, timeout, host=env.rank == 0)


@dataclass
class Topology:
    """Sizes, ranks, groups, device and backend of this run (megatron-core's parallel_state groups)."""

    env: LaunchEnv
    device: torch.device
    backend: str
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int
    vpp: Optional[int]
    cp: int = 1
    _background: Optional[object] = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0

    # Ranks and groups are megatron-core's; asked here so the rest of megamoe never imports parallel_state.
    @property
    def tp_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    @property
    def ep_rank(self) -> int:
        return ps.get_expert_model_parallel_rank()

    @property
    def etp_rank(self) -> int:
        return ps.get_expert_tensor_parallel_rank()

    @property
    def edp_rank(self) -> int:
        return ps.get_expert_data_parallel_rank()

    @property
    def cp_rank(self) -> int:
        return ps.get_context_parallel_rank()

    @property
    def cp_group(self):
        return ps.get_context_parallel_group()

    @property
    def dp_cp_group(self):
        """DP x CP: the replicas of the dense parameters (CP ranks hold the same weights, other tokens)."""
        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def dp_cp_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    @property
    def tp_group(self):
        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        return ps.get_pipeline_model_parallel_group()

    @property
    def dp_group(self):
        return ps.get_data_parallel_group()

    @property
    def ep_group(self):
        return ps.get_expert_model_parallel_group()

    @property
    def etp_group(self):
        return ps.get_expert_tensor_parallel_group()

    @property
    def edp_group(self):
        return ps.get_expert_data_parallel_group()

    @property
    def model_parallel_group(self):
        """TP x PP: the ranks that together hold one copy of the dense parameters (the global norm's group)."""
        return ps.get_model_parallel_group()

    @property
    def expert_model_parallel_group(self):
        """ETP x EP x PP: the ranks that together hold one copy of every expert (the global norm's group)."""
        return ps.get_expert_tensor_model_pipeline_parallel_group()

    @property
    def in_embedding_group(self) -> bool:
        """This rank holds a copy of a tied embedding shared between the first and last pipeline stages."""
        return ps.is_rank_in_embedding_group()

    @property
    def embedding_group(self):
        return ps.get_embedding_group()

    @property
    def amax_group(self):
        """This pipeline stage's TP x DP ranks: where FP8 amaxes are reduced, as megatron-core does."""
        return ps.get_amax_reduction_group(with_context_parallel=True)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def background_group(self):
        """A gloo group of every rank for work beside training (a background checkpoint save), so its collectives
        never interleave with training's on the default group. Made at the first call, which every rank makes at
        the same point of the run (a collective)."""
        if self._background is None:
            self._background = dist.new_group(backend="gloo")
        return self._background

    def describe(self) -> str:
        cp = f"CP {self.cp} x " if self.cp > 1 else ""
        return (f"world {self.world_size} ({self.env.launcher}, {self.backend} on {self.device.type}) = "
                f"TP {self.tp} x {cp}PP {self.pp} x DP {self.dp}; experts: EP {self.ep} x ETP {self.etp} x "
                f"expert-DP {self.edp}" + (f"; virtual stages {self.vpp}" if self.vpp else ""))


def init_distributed(parallel: ParallelConfig) -> Topology:
    """Start torch.distributed and megatron-core's model-parallel groups; idempotent per process."""
    env = detect_launch_env()
    use_cuda = torch.cuda.is_available() and parallel.backend != "gloo"
    backend = "nccl" if use_cuda else "gloo"
    if parallel.backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA devices; use backend auto or gloo on CPU")
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # megatron-core's advice to set CUDA_DEVICE_MAX_CONNECTIONS=1 (so its async TP all-reduce is queued
        # before the weight-gradient GEMM) concerns GPU streams; on CPU it is noise in every TP run.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")

    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        if env.launcher == "single":
            # One process needs no rendezvous: an in-memory store avoids picking a port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
            dist.init_process_group(backend, store=rendezvous_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    vpp = parallel.virtual_pipeline_model_parallel_size
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.resolved_etp,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        # On gloo the default groups already are gloo groups; extra ones would double the sockets.
        create_gloo_process_groups=use_cuda,
    )
    world = env.world_size
    tp, pp, ep, etp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                           parallel.expert_model_parallel_size, parallel.resolved_etp, parallel.context_parallel_size)
    return Topology(env=env, device=device, backend=backend, tp=tp, pp=pp, ep=ep, etp=etp,
                    dp=world // (tp * cp * pp), edp=world // (etp * ep * pp), vpp=vpp if vpp and vpp > 1 else None,
                    cp=cp)


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (tests, end of a run)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

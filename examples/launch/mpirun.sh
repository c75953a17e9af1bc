#!/usr/bin/env bash
# Launch with MPI (mpi4py gives megamoe rank, world size, local rank; rank 0's host is the rendezvous).
#   NP=16 HOSTFILE=hosts bash examples/launch/mpirun.sh --config examples/paper/moe_mamba_25m.yaml ...
# Needs `pip install megamoe[mpi]` (MPICH) or the system MPI that mpi4py was built against.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # as in Megatron-LM's examples (TP overlap)
# Open MPI forwards only the variables named with -x; MPICH and Intel MPI (Hydra) forward the whole environment
# and reject -x.
forward=()
if [[ "$(mpirun --version 2>&1 || true)" == *"Open MPI"* ]]; then
    for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV CUDA_DEVICE_MAX_CONNECTIONS; do
        if [[ -n "${!var:-}" ]]; then forward+=(-x "$var"); fi
    done
fi
exec mpirun -np "${NP:-2}" ${HOSTFILE:+--hostfile "$HOSTFILE"} ${forward[@]+"${forward[@]}"} \
    python -m megamoe.cli.train "$@"

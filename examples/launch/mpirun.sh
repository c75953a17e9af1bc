#!/usr/bin/env bash
# Launch with MPI (mpi4py gives megamoe rank, world size, local rank; rank 0's host is the rendezvous).
#   NP=16 HOSTFILE=hosts bash examples/launch/mpirun.sh --config examples/paper/moe_mamba_25m.yaml ...
# Needs `pip install megamoe[mpi]` (or the system MPI that mpi4py was built against).
set -euo pipefail
exec mpirun -np "${NP:-2}" ${HOSTFILE:+--hostfile "$HOSTFILE"} -x PATH -x LD_LIBRARY_PATH \
    python -m megamoe.cli.train "$@"

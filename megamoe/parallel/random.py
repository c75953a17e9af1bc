"""Random streams that do not depend on the parallel layout.

megatron-core's CUDA RNG tracker does not run on CPU, and it seeds initialisation per TP rank, so
layouts differ. megamoe instead (1) seeds the default generators identically on every rank, so a
model built on any rank is the same full model before it is sharded, and (2) gives named streams
(`generator_for`) derived from the seed and a name, for anything that must differ per rank (e.g. a
data-parallel rank's noise) or stay fixed whatever the layout (one parameter's initialisation).
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from megamoe.model import stream_seed


def generator_for(seed: int, name: str, device: Optional[torch.device] = None) -> torch.Generator:
    """A torch.Generator for the named stream on `device` (CPU by default)."""
    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed(stream_seed(seed, name))
    return gen


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds all CUDA devices


def get_rng_state() -> dict:
    """Python's, NumPy's, torch's CPU and this rank's CUDA generator state, for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This rank's device only: a resume may see fewer GPUs (srun --gpus-per-task=1), and the others'
        # generators belong to other ranks.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved before 2026-11-25: every visible device's state
            cuda = cuda[torch.cuda.current_device() % len(cuda)]
        torch.cuda.set_rng_state(cuda)

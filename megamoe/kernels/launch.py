"""Launch helpers shared by the Triton kernels: interpreter detection, device checks, cached autotuners.

Triton decides at decoration time whether a kernel is compiled for the GPU or run by its CPU interpreter
(`TRITON_INTERPRET=1` set before `megamoe.kernels` is imported). Interpreted kernels run one fixed
configuration (autotuning would only multiply the interpreter's cost); compiled ones are autotuned.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Hashable, List, Sequence

import torch
import triton

_AUTOTUNERS: Dict[Hashable, Callable] = {}

# Passed to every launch: the recurrences (h = a * h + b) are written for fused multiply-adds, as mamba_ssm's CUDA
# kernels compile them. Triton 3.9 enables fusion only by default and warns that 3.10 will turn it off; pinning it
# keeps results and speed the same across versions. The interpreter ignores the option.
FP_FUSION = {"enable_fp_fusion": True}


def interpreting(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


def check_device(kernel, name: str, *tensors: torch.Tensor) -> None:
    """Refuse CPU tensors for a compiled kernel and mixed devices, with the fix in the message."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting(kernel):
        raise RuntimeError(f"{name}: the Triton kernels need CUDA tensors (got {device}); on CPU use "
                           "megamoe.ops (which picks the PyTorch scan), or set TRITON_INTERPRET=1 before "
                           "importing megamoe.kernels to run them in Triton's interpreter")


def on_device(device: torch.device):
    """Make the tensors' GPU current for a launch: Triton launches on the current device, so tensors on cuda:1
    while cuda:0 is current would be read on the wrong GPU. (Backward needs no guard: autograd runs a device's
    backward on a thread with that device current.)"""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tuned(kernel, cache_key: Hashable, configs: List[triton.Config], key: Sequence[str]) -> Callable:
    """An autotuned view of `kernel` over `configs`, built once per `cache_key` (e.g. per padded d_state).
    Autotuning runs the kernel several times on the real arguments, so kernels must not depend on the
    outputs' previous contents (whether `reset_to_zero` also covers the final launch differs by version)."""
    full_key = (kernel.fn.__name__, cache_key)
    if full_key not in _AUTOTUNERS:
        _AUTOTUNERS[full_key] = triton.autotune(configs=configs, key=list(key))(kernel)
    return _AUTOTUNERS[full_key]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a guess of 1 elsewhere, e.g. in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1

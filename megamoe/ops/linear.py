"""Matrix products for decoding, a few rows x against a weight read once from memory.

    linear(x, W, b)    x W^T + b, W stored (out, in) as nn.Linear's
    matmul_in_out(x, W)  x W, W stored (in, out) as the experts' (Experts.w1[e], w2[e])

A decode step is a chain of such products, bound by reading the weights. On CPU, torch's F.linear goes to MKL's
GEMV, which on the AMD EPYC machines this project builds on streams weights at about 14 GB/s with 2 threads;
oneDNN's matmul (aten's `mkldnn._linear_pointwise`, what torch.compile's CPU backend calls for linears) streams
an (out, in) weight at about 39 GB/s, near the machine's read bandwidth. A weight stored (in, out) streams at
about 20 GB/s through either library, and at about 33 GB/s as a batched product of one block of its rows per
thread, summed. So CPU inference without autograd takes these paths; everything else (CUDA, where cuBLAS is at
the bandwidth; autograd; other dtypes; a torch without oneDNN) is F.linear and x @ W. Written here because no
library exposes a GEMV-shaped CPU product that reads weights at the bandwidth; bench/bench_generate.py measures it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ONEDNN = hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
    torch.backends.mkldnn.is_available()
_ONEDNN_MIN = 1 << 18  # weights below 1 MiB (fp32): oneDNN's ~12 us per call costs more than it saves


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in), weight (out, in) (any strides, e.g. an expert's (in, out) slice
    transposed), bias (out,)."""
    if _ONEDNN and weight.numel() >= _ONEDNN_MIN and _cpu_inference(x, weight):
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), weight, bias, "none", [], "")
        return out.reshape(*shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def matmul_in_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight: x (rows, in), weight (in, out) contiguous."""
    blocks = torch.get_num_threads()
    if blocks < 2 or x.shape[-1] % blocks or not _cpu_inference(x, weight) or not weight.is_contiguous():
        return x @ weight
    d_in, d_out = weight.shape
    parts = x.reshape(-1, blocks, d_in // blocks).transpose(0, 1)  # (blocks, rows, in / blocks)
    return torch.bmm(parts, weight.view(blocks, d_in // blocks, d_out)).sum(0)


def module_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain nn.Linear through `linear`; a module with a decode `step` (an MoE projection) through it; any
    other (a tensor-parallel linear) called as is."""
    if type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias)
    return module.step(x) if hasattr(module, "step") else module(x)

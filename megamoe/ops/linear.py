"""Matrix products for decoding, a few rows x against a weight read once from memory.

    linear(x, W, b)      x W^T + b, W stored (out, in) as nn.Linear's
    matmul_in_out(x, W)  x W, W (in, out) as the experts' (Experts.w1[e], w2[e]), stored either way
    store_out_in(W)      W's values stored (..., out, in)

A decode step is a chain of such products, bound by reading the weights. On this project's 2-core AMD EPYC
machines (2 threads, weights far beyond the caches, read bandwidth 22-33 GB/s in the same runs), an (out, in)
weight streams at about 10 GB/s through F.linear (MKL's GEMV), at 13-20 GB/s through oneDNN's matmul (aten's
`mkldnn._linear_pointwise`), and at 23-35 GB/s, the bandwidth, as a batch of MKL matrix-vector products, one
block of the weight's rows per thread. So one fp32 token takes the row blocks, and a few rows take oneDNN
(8-17 GB/s; neither library does better with 2-8 rows here). A weight stored (in, out) streams at only 13-23
GB/s, as a batch of one block of its rows per thread, summed: so megamoe.inference.loading.for_cpu_decoding
stores the experts' weights (out, in) (store_out_in), and matmul_in_out takes them through `linear`. In bf16
every path streams at 8-16 GB/s, torch's own (oneDNN) as fast as any, so bf16 takes that. Everything else
(CUDA, where cuBLAS is at the bandwidth; autograd; other dtypes; a torch without oneDNN) is F.linear and x @ W.
In a compiled decode step (megamoe.inference.compiled) the same calls are traced: each large product stays one
MKL or oneDNN call, the small ones are Inductor's.
Written here because no library exposes a GEMV-shaped CPU product that reads weights at the bandwidth;
`bench/bench_generate.py --products` measures each path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ONEDNN = hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
    torch.backends.mkldnn.is_available()
_ONEDNN_MIN = 1 << 18  # weights below 1 MiB (fp32): oneDNN's ~12 us per call costs more than it saves
_BLOCKS_MIN = 1 << 16  # below 256 KiB (fp32) a single GEMV is as fast


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


_ZERO = torch.zeros(())


@torch.compiler.assume_constant_result  # a compiled decode step splits the rows as when it was traced
def _threads() -> int:
    return torch.get_num_threads()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in), weight (out, in) (any strides, e.g. an expert's (in, out) slice
    transposed), bias (out,)."""
    if not _cpu_inference(x, weight) or (torch.compiler.is_compiling() and weight.numel() < _BLOCKS_MIN):
        return F.linear(x, weight, bias)  # (a compiled decode step's small products: Inductor fuses them)
    blocks, shape = _threads(), x.shape
    if (x.numel() == shape[-1] and x.stride(-1) == 1 and x.dtype == torch.float32 and blocks > 1
            and weight.numel() >= _BLOCKS_MIN and weight.shape[0] % blocks == 0 and weight.is_contiguous()):
        # One token: a batch of matrix-vector products, one block of the weight's rows per thread. x is given
        # with x.T's strides, which MKL takes as a vector (a (1, in, 1) view of stride 1 it does not). baddbmm,
        # as fast as bmm here, because Inductor keeps it one MKL call, where it rewrites a bmm of a vector into
        # its own reduction loop (slower); the bias comes in as baddbmm's input.
        column = x.as_strided((blocks, shape[-1], 1), (0, 1, shape[-1]))
        start, beta = (_ZERO, 0) if bias is None else (bias.view(blocks, -1, 1), 1)
        out = torch.baddbmm(start, weight.view(blocks, -1, shape[-1]), column, beta=beta)
        return out.view(*shape[:-1], weight.shape[0])
    if _ONEDNN and weight.numel() >= _ONEDNN_MIN:
        onednn = torch.ops.megamoe.onednn_linear if torch.compiler.is_compiling() else _onednn_linear
        return onednn(x.reshape(-1, shape[-1]), weight, bias).reshape(*shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# In a compiled step, oneDNN's product as an opaque op: Inductor lowers mkldnn._linear_pointwise only for the
# prepacked weights of its own freezing. A plain library op, which the dispatcher calls in ~2 us
# (torch.library.custom_op's wrapper costs ~9 us a call).
_LIB = torch.library.Library("megamoe", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("megamoe::onednn_linear", lib=_LIB)
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def matmul_in_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight: x (rows, in), weight (in, out), contiguous or stored (out, in) (see store_out_in)."""
    if weight.t().is_contiguous():
        return linear(x, weight.t())
    if torch.compiler.is_compiling():
        return x @ weight
    blocks = torch.get_num_threads()
    if (blocks < 2 or x.shape[-1] % blocks or x.dtype != torch.float32 or not _cpu_inference(x, weight)
            or not weight.is_contiguous()):
        return x @ weight
    d_in, d_out = weight.shape
    parts = x.reshape(-1, blocks, d_in // blocks).transpose(0, 1)  # (blocks, rows, in / blocks)
    return torch.bmm(parts, weight.view(blocks, d_in // blocks, d_out)).sum(0)


def store_out_in(weight: torch.Tensor) -> torch.Tensor:
    """The same (..., in, out) values stored (..., out, in), in which a one-token product reads them fastest."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def module_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain nn.Linear through `linear`; a module with a decode `step` (an MoE projection) through it; any
    other (a tensor-parallel linear) called as is."""
    if type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias)
    return module.step(x) if hasattr(module, "step") else module(x)

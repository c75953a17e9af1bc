"""The kernels compile for an H100 (sm_90) with no GPU present: Triton's front end, layouts, LLVM and ptxas.

The interpreter accepts some programs the compiler rejects; this catches those on CPU-only CI machines.
"""
import inspect

import pytest
import triton

from megamoe.kernels import causal_conv1d, selective_scan, selective_state_update
from megamoe.kernels.launch import FP_FUSION, interpreting

BF16 = ("u_ptr", "delta_ptr", "z_ptr", "y_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr",
        "x_ptr", "dt_ptr", "dy_ptr", "dx_ptr")
INT32 = ("seq_ptr",)
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
SCAN = dict(FLAGS, HAS_SEQ=True)  # packed documents: the decay cut at their starts
KERNELS = {
    "scan_fwd": (selective_scan._scan_fwd_kernel, dict(SCAN, HAS_H0=True, SAVE_STATES=True, SAVE_LAST=True, CHUNK_L=64,
                                                        BLOCK_N=16, BLOCK_D=4, BLOCK_L=32), 4),
    "scan_bwd": (selective_scan._scan_bwd_kernel, dict(SCAN, HAS_DLAST=True, BLOCK_N=16, CHUNK_L=64, GROUP_D=8,
                                                        BLOCK_D=2), 8),
    "state_update": (selective_state_update._state_update_kernel, dict(FLAGS, BLOCK_D=32, BLOCK_N=16), 4),
    "conv_fwd": (causal_conv1d._conv_fwd_kernel, dict(HAS_BIAS=True, SILU=True, WIDTH=4, HAS_SEQ=True, BLOCK_D=16,
                                                       BLOCK_L=128), 4),
    "conv_bwd": (causal_conv1d._conv_bwd_kernel, dict(HAS_BIAS=True, SILU=True, WIDTH=4, WIDTH_P2=4, HAS_SEQ=True,
                                                       BLOCK_D=16, BLOCK_L=128), 4),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_compiles_for_sm90(name):
    kernel, constexprs, num_warps = KERNELS[name]
    if interpreting(kernel):
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels are interpreted, not compiled")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # a Triton build without the CUDA backend
        pytest.skip(f"no CUDA backend in this Triton: {e}")
    signature = {name: "constexpr" if name in constexprs else (
        "*bf16" if name in BF16 else "*i32" if name in INT32 else "*fp32") if name.endswith("_ptr") else "i32"
        for name in inspect.signature(kernel.fn).parameters}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **FP_FUSION})
    assert compiled.asm["cubin"], "no cubin produced"
    assert compiled.metadata.num_warps == num_warps
    assert compiled.metadata.enable_fp_fusion, "the recurrences are written for fused multiply-adds"

"""The Triton selective scan against selective_scan_ref: values and gradients of every input.

On CPU the kernels run in Triton's interpreter (in a child process, see conftest.py); with CUDA the same
checks run on the compiled kernels, plus a longer sequence at the default chunk length.
"""
import pytest
import torch

from tests.kernels._checks import SCAN_CASES, check_scan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("case", sorted(SCAN_CASES))
def test_scan_interpreted(interpreted, case):
    assert interpreted[f"scan/{case}"] == "ok", interpreted[f"scan/{case}"]


@cuda
@pytest.mark.parametrize("case", sorted(SCAN_CASES))
def test_scan_cuda(case):
    check_scan("cuda", **SCAN_CASES[case])


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_state", [16, 64])
def test_scan_cuda_default_chunks(dtype, d_state):
    check_scan("cuda", batch=2, d_inner=40, d_state=d_state, seqlen=300, chunk_len=None, dtype=dtype)


@cuda
def test_dispatcher_uses_triton_on_cuda():
    from megamoe.ops import selective_scan, selective_scan_ref

    u, delta, z = (torch.randn(2, 8, 33, device="cuda") for _ in range(3))
    A = -torch.rand(8, 16, device="cuda")
    B, C = torch.randn(2, 16, 33, device="cuda"), torch.randn(2, 16, 33, device="cuda")
    y = selective_scan(u, delta, A, B, C, None, z, None, True)
    torch.testing.assert_close(y, selective_scan_ref(u, delta, A, B, C, None, z, None, True), rtol=1e-4, atol=1e-4)


def test_cpu_tensors_with_compiled_kernels_raise_a_clear_error():
    from megamoe.kernels.launch import interpreting
    from megamoe.kernels.selective_scan import _scan_fwd_kernel, selective_scan_triton

    if interpreting(_scan_fwd_kernel):
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are accepted")
    u = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        selective_scan_triton(u, u, -torch.rand(2, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4))


def test_bad_shapes_name_the_input():
    from megamoe.kernels.selective_scan import selective_scan_triton

    u = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_triton(u, u, -torch.rand(2, 4), torch.randn(1, 3, 4), torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="d_state=80 > 64"):
        selective_scan_triton(u, u, -torch.rand(2, 80), torch.randn(1, 80, 4), torch.randn(1, 80, 4))

"""The Triton causal depthwise conv1d (+SiLU) against F.conv1d: values and gradients (interpreter or CUDA)."""
import pytest
import torch

from tests.kernels._checks import CONV_CASES, check_conv


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_interpreted(interpreted, case):
    assert interpreted[f"conv/{case}"] == "ok", interpreted[f"conv/{case}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_cuda(case):
    check_conv("cuda", **CONV_CASES[case])

"""The Triton one-token state update against selective_state_update_ref (interpreter on CPU, or CUDA)."""
import pytest
import torch

from tests.kernels._checks import STATE_UPDATE_CASES, check_state_update


@pytest.mark.parametrize("case", sorted(STATE_UPDATE_CASES))
def test_state_update_interpreted(interpreted, case):
    assert interpreted[f"state_update/{case}"] == "ok", interpreted[f"state_update/{case}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(STATE_UPDATE_CASES))
def test_state_update_cuda(case):
    check_state_update("cuda", **STATE_UPDATE_CASES[case])

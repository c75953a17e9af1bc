"""LR schedule values: linear warmup, cosine to min_lr (0.1 x lr by default), flat after the end."""
import math

import pytest

from megamoe.config import OptimizerConfig
from megamoe.training.schedule import lr_at, warmup_iters


def test_warmup_then_cosine_to_tenth():
    opt = OptimizerConfig(lr=1e-3, lr_warmup_fraction=0.01)
    assert warmup_iters(opt, 1000) == 10
    assert lr_at(0, opt, 1000) == pytest.approx(1e-4)
    assert lr_at(9, opt, 1000) == pytest.approx(1e-3)
    assert lr_at(10, opt, 1000) == pytest.approx(1e-3)
    mid = 10 + (1000 - 10) / 2
    assert lr_at(int(mid), opt, 1000) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)), rel=1e-2)
    assert lr_at(1000, opt, 1000) == pytest.approx(1e-4)
    assert lr_at(5000, opt, 1000) == pytest.approx(1e-4)


def test_linear_constant_and_explicit_warmup():
    opt = OptimizerConfig(lr=2.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="linear")
    assert [lr_at(s, opt, 4) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    opt = OptimizerConfig(lr=2.0, lr_warmup_iters=2, lr_decay_style="constant")
    assert [lr_at(s, opt, 10) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]

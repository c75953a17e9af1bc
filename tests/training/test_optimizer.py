"""AdamW parameter groups: no weight decay on norms, biases, A_log and D."""
import torch

from megamoe.config import OptimizerConfig
from megamoe.training.optimizer import build_optimizer, param_groups


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = torch.nn.Linear(4, 8)
        self.A_log = torch.nn.Parameter(torch.zeros(8, 2))
        self.D = torch.nn.Parameter(torch.ones(8))
        self.norm = torch.nn.LayerNorm(4)


def test_no_decay_groups():
    m = Tiny()
    groups = param_groups(m, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(m.in_proj.weight)}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 5  # in_proj.bias, A_log, D, norm weight and bias


def test_optimizer_on_cpu_applies_decoupled_decay():
    m = Tiny()
    opt = build_optimizer(m, OptimizerConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    before_w, before_d = m.in_proj.weight.detach().clone(), m.D.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(m.in_proj.weight, before_w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(m.D, before_d)

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

FP8_RECIPES = []  # every recipe fp8_autocast was entered with
FP8_GROUPS = []  # ...and its amax reduction group


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, tp_group=None, tp_size=1, parallel_mode=None,
                 params_dtype=torch.float32, device="cuda"):
        super().__init__()
        assert parallel_mode in (None, "column", "row")
        self.mode, self.tp_group = parallel_mode, tp_group
        out_local = out_features // tp_size if parallel_mode == "column" else out_features
        in_local = in_features // tp_size if parallel_mode == "row" else in_features
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=params_dtype, device=device)) if bias else None

    def forward(self, x):
        from megamoe.parallel.tensor_parallel import copy_to_tp, reduce_from_tp
        if self.mode == "column":
            return F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)
        if self.mode == "row":
            out = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def fp8_autocast(enabled=True, fp8_recipe=None, fp8_group=None):
    FP8_RECIPES.append(fp8_recipe)
    FP8_GROUPS.append(fp8_group)
    yield

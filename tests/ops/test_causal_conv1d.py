"""The CPU causal conv1d equals nn.Conv1d padded and cut to the causal part, and SiLU."""
import torch

from megamoe.ops import causal_conv1d


def test_matches_padded_conv1d_and_only_looks_back():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 9)
    want = torch.nn.functional.silu(conv(x)[..., :9])
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias, activation="silu"), want)
    torch.testing.assert_close(causal_conv1d(x, conv.weight[:, 0], conv.bias), conv(x)[..., :9])
    x2 = x.clone()
    x2[..., 5:] = 0  # the future does not change the past
    torch.testing.assert_close(causal_conv1d(x2, conv.weight)[..., :5], causal_conv1d(x, conv.weight)[..., :5])

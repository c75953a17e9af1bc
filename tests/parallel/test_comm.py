"""The expert-parallel all-to-all: variable splits, forward and gradient, byte counting."""
import torch

from megamoe.config import ParallelConfig
from megamoe.parallel import init_distributed
from megamoe.parallel.comm import COUNTER, all_to_all, all_to_all_counts
from megamoe.testing import run_on_ranks


def _exchange():
    topo = init_distributed(ParallelConfig(expert_model_parallel_size=2))
    r = topo.rank
    # rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 rows to rank 0 and 0 to itself
    input_splits = [[1, 2], [3, 0]][r]
    x = (torch.arange(sum(input_splits) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * r).requires_grad_()
    output_splits = all_to_all_counts(torch.tensor(input_splits), topo.ep_group).tolist()
    COUNTER.reset()
    y = all_to_all(x, output_splits, input_splits, topo.ep_group)
    sent = COUNTER.bytes["ep_all_to_all"]
    (y * (torch.arange(y.shape[0])[:, None] + 1)).sum().backward()
    return output_splits, y.detach().tolist(), x.grad.tolist(), sent


def test_all_to_all_with_uneven_splits():
    (s0, y0, g0, b0), (s1, y1, g1, b1) = run_on_ranks(_exchange, 2)
    assert s0 == [1, 3] and s1 == [2, 0]
    assert y0 == [[0, 1], [100, 101], [102, 103], [104, 105]]
    assert y1 == [[2, 3], [4, 5]]
    # d(sum of row_index+1 * y)/dx: each row's weight comes back to where the row came from
    assert g0 == [[1, 1], [1, 1], [2, 2]] and g1 == [[2, 2], [3, 3], [4, 4]]
    assert (b0, b1) == (2 * 2 * 4, 3 * 2 * 4)  # rows that left the rank x 2 floats x 4 bytes

"""Gradient averaging over data-parallel replicas, and a global norm that counts each parameter once."""
import math

import torch

from megamoe.config import ParallelConfig
from megamoe.parallel import init_distributed
from megamoe.parallel.data_parallel import GradientReducer, clip_gradients, global_grad_norm
from megamoe.testing import run_on_ranks


def _dp_average():
    topo = init_distributed(ParallelConfig())
    dense = torch.nn.Parameter(torch.zeros(3))
    expert = torch.nn.Parameter(torch.zeros(2))
    expert.is_expert = True
    dense.grad = torch.full((3,), float(topo.rank + 1))
    expert.grad = torch.full((2,), float(10 * (topo.rank + 1)))
    reducer = GradientReducer([dense, expert], topo, bucket_bytes=4)  # tiny buckets: one tensor each
    reducer.start(1)
    reducer.finish()  # no backward ran, so no hook started a bucket: finish reduces them all
    return dense.grad.tolist(), expert.grad.tolist()


def test_dp2_averages_dense_and_expert_gradients():
    for dense, expert in run_on_ranks(_dp_average, 2):
        assert dense == [1.5] * 3 and expert == [15.0] * 2


def _tp_norm():
    topo = init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    shard = torch.nn.Parameter(torch.zeros(2))
    shard.tensor_model_parallel = True
    replicated = torch.nn.Parameter(torch.zeros(1))
    shard.grad = torch.full((2,), float(topo.tp_rank + 1))  # full gradient [1, 1, 2, 2]
    replicated.grad = torch.tensor([3.0])  # the same on both TP ranks: counted once
    norm = global_grad_norm([shard, replicated], topo)
    clipped = clip_gradients([shard, replicated], 1.0, topo)
    return norm, clipped, global_grad_norm([shard, replicated], topo)


def test_tp2_norm_counts_replicated_parameters_once():
    expected = math.sqrt(1 + 1 + 4 + 4 + 9)
    for norm, before, after in run_on_ranks(_tp_norm, 2):
        assert math.isclose(norm, expected, rel_tol=1e-6) and math.isclose(before, expected, rel_tol=1e-6)
        assert math.isclose(after, 1.0, rel_tol=1e-5)


def _overlapped_backward():
    """Two micro-batches of a real backward: buckets start from the hooks; the result is the DP average."""
    topo = init_distributed(ParallelConfig())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    reducer = GradientReducer(model.parameters(), topo, bucket_bytes=64)
    assert len(reducer.buckets) > 1
    reducer.start(2)
    for micro in range(2):
        x = torch.full((3, 4), float(topo.rank + micro))
        model(x).sum().backward()
    started = reducer.launched
    reducer.finish()
    return started, len(reducer.buckets), [p.grad.clone() for p in model.parameters()]


def test_overlapped_buckets_start_during_backward_and_average():
    (s0, n, g0), (s1, _, g1) = run_on_ranks(_overlapped_backward, 2)
    assert s0 == s1 == n  # every bucket was started by the hooks, before finish()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    for rank in range(2):
        for micro in range(2):
            (model(torch.full((3, 4), float(rank + micro))).sum() / 2).backward()
    for got0, got1, want in zip(g0, g1, model.parameters()):
        torch.testing.assert_close(got0, want.grad)
        torch.testing.assert_close(got1, want.grad)

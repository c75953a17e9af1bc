"""megatron-core TP layers built from full layers compute what the full layers compute, on 2 gloo ranks."""
import pytest
import torch

from megamoe.config import ParallelConfig
from megamoe.parallel import init_distributed
from megamoe.parallel.sharding import ShardSpec, take_shard
from megamoe.parallel.tensor_parallel import (
    ColumnParallel,
    RowParallel,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megamoe.testing import run_on_ranks


def test_shard_regions_split_each_partition_block():
    full = torch.arange(8)
    assert take_shard(full, ShardSpec((8,), 0), 1, 2).tolist() == [4, 5, 6, 7]
    assert take_shard(full, ShardSpec((8,), 0, (4, 4)), 1, 2).tolist() == [2, 3, 6, 7]
    experts = torch.arange(4 * 6).reshape(4, 1, 6)  # 4 experts, width 6 = [gate 3 | up 3]
    spec = ShardSpec((4, 1, 6), 2, (3, 3), expert_dim=0)
    assert spec.regions(1, 1, 1, 2) == [((0, 0, 0), (2, 0, 0), (2, 1, 6))]
    assert take_shard(experts, ShardSpec((4, 1, 6), 2, expert_dim=0), 0, 2, 1, 2)[:, 0].tolist() == [[12, 13, 14],
                                                                                                       [18, 19, 20]]


def _mlp_and_vocab():
    topo = init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)
    emb, head = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 10, bias=False)
    ids = torch.randint(0, 10, (2, 5))
    labels = torch.randint(0, 10, (2, 5))

    def full_loss():
        h = emb(ids)
        h = h + fc2(torch.relu(fc1(h)))
        return torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels.flatten())

    ref = full_loss()
    ref.backward()
    pfc1, pfc2 = ColumnParallel(fc1, topo, partitions=[4, 4]), RowParallel(fc2, topo, partitions=[4, 4])
    pemb, phead = VocabParallelEmbedding(emb, topo), ColumnParallel(head, topo)
    h = pemb(ids)
    h = h + pfc2(torch.relu(pfc1(h)))
    loss = vocab_parallel_cross_entropy(phead(h), labels, topo.tp_group).mean()
    loss.backward()
    rows = take_shard(torch.arange(8), ShardSpec((8,), 0, (4, 4)), topo.tp_rank, 2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pfc1.weight.grad, fc1.weight.grad[rows])
    torch.testing.assert_close(pfc2.weight.grad, fc2.weight.grad[:, rows])
    torch.testing.assert_close(pfc2.bias.grad, fc2.bias.grad)
    torch.testing.assert_close(pemb.weight.grad, take_shard(emb.weight.grad, ShardSpec((10, 6), 0), topo.tp_rank, 2))
    full_logits = head(emb(ids) + fc2(torch.relu(fc1(emb(ids)))))
    torch.testing.assert_close(phead(h), take_shard(full_logits, ShardSpec((2, 5, 10), 2), topo.tp_rank, 2))
    return loss.item()


def test_tp2_layers_match_full_layers():
    losses = run_on_ranks(_mlp_and_vocab, 2)
    assert losses[0] == losses[1]



def _moe_output_with_every_token_on_expert_0(autocast, ep):
    """A Switch MoE whose router sends every token to expert 0: under EP 2, rank 1's experts get none."""
    from megamoe.model.moe import SwitchMoE
    from megamoe.parallel.expert_parallel import parallelize_moe
    torch.manual_seed(0)
    moe = SwitchMoE(16, 4, 32, capacity_factor=0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    if ep > 1:
        parallelize_moe(moe, init_distributed(ParallelConfig(expert_model_parallel_size=ep)))
    x = torch.ones(1, 8, 16) + 0.01 * torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return moe(x).float().detach()


@pytest.mark.parametrize("autocast", [False, True])
def test_expert_parallel_rank_without_tokens_under_autocast(autocast):
    """A rank whose experts receive nothing sends back the autocast dtype the all-to-all's buffers take
    (it once sent float32 into bf16 buffers: garbage on gloo, a hang on NCCL)."""
    want = _moe_output_with_every_token_on_expert_0(autocast, ep=1)
    for y in run_on_ranks(_moe_output_with_every_token_on_expert_0, 2, args=(autocast, 2)):
        torch.testing.assert_close(y, want, rtol=1e-2 if autocast else 1e-6, atol=1e-3 if autocast else 1e-6)

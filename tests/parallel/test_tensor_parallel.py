"""megatron-core TP layers built from full layers compute what the full layers compute, on 2 gloo ranks."""
import torch

from megamoe.config import ParallelConfig
from megamoe.parallel import init_distributed
from megamoe.parallel.tensor_parallel import (ColumnParallel, RowParallel, VocabParallelEmbedding, gather_from_tp,
                                              shard_index, vocab_parallel_cross_entropy)
from megamoe.testing import run_on_ranks


def test_shard_index_blocks():
    assert shard_index(8, 1, 2).tolist() == [4, 5, 6, 7]
    assert shard_index(8, 1, 2, partitions=[4, 4]).tolist() == [2, 3, 6, 7]


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
    loss = vocab_parallel_cross_entropy(phead(h), labels).mean()
    loss.backward()
    rows = shard_index(8, topo.tp_rank, 2, [4, 4])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pfc1.weight.grad, fc1.weight.grad[rows])
    torch.testing.assert_close(pfc2.weight.grad, fc2.weight.grad[:, rows])
    torch.testing.assert_close(pfc2.bias.grad, fc2.bias.grad)
    torch.testing.assert_close(pemb.weight.grad, emb.weight.grad[shard_index(10, topo.tp_rank, 2)])
    full_logits = gather_from_tp(phead(h), topo.tp_group)
    torch.testing.assert_close(full_logits, head(emb(ids) + fc2(torch.relu(fc1(emb(ids))))))
    return loss.item()


def test_tp2_layers_match_full_layers():
    losses = run_on_ranks(_mlp_and_vocab, 2)
    assert losses[0] == losses[1]

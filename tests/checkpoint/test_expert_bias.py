"""The expert bias of aux-loss-free balancing is model state: saved by PP2 (each stage its own layers' biases),
loaded by EP2 and by one process, which carry on with the same losses and the same bias updates."""
import pytest
import torch

from megamoe import checkpoint
from megamoe.parallel import destroy_distributed
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import TrainState
from tests.checkpoint.common import Rank, config

BIAS = dict(pattern="MEME", top_k=2, router_score_function="sigmoid", router_enable_expert_bias=True,
            router_bias_update_rate=0.01)


def _biases(rank: Rank) -> dict:
    return full_tensors({n: b for n, b in rank.model.named_buffers() if n.endswith("expert_bias")}, rank.topo)


def _resume(rank: Rank, root: str) -> dict:
    """Load the PP2 checkpoint, then step 3 (the fourth)."""
    checkpoint.load(f"{root}/pp2", rank.model, rank.optimizer, rank.cfg, rank.topo)
    loaded = _biases(rank)
    return dict(loaded=loaded, loss=rank.train(3, 1), after=_biases(rank))


def _two_ranks(root: str) -> dict:
    pp = Rank(config(pp=2, **BIAS))
    pp.train(0, 3)
    checkpoint.save(f"{root}/pp2", pp.model, pp.optimizer, TrainState(step=3), pp.cfg, pp.topo)
    out = dict(saved=_biases(pp), stage_biases=sorted(n for n, _ in pp.model.named_buffers()))
    out.update(loss=pp.train(3, 1), after=_biases(pp))
    out["ep2"] = _resume(Rank(config(ep=2, **BIAS)), root)
    return out


@pytest.mark.slow
def test_expert_bias_saved_in_pp2_loads_in_ep2_and_one_process(tmp_path):
    pp2 = run_on_ranks(_two_ranks, 2, args=(str(tmp_path),), timeout=400)
    assert pp2[0]["stage_biases"] != pp2[1]["stage_biases"]  # each stage saved only its own layers' biases
    saved = pp2[0]["saved"]
    assert sorted(saved) == ["layers.1.moe.router.expert_bias", "layers.3.moe.router.expert_bias"]
    assert all(b.abs().sum() > 0 for b in saved.values())  # 3 steps moved them
    try:
        one = _resume(Rank(config(**BIAS)), str(tmp_path))
    finally:
        destroy_distributed()
    for resumed in (pp2[0]["ep2"], one):
        for name, b in saved.items():
            assert torch.equal(resumed["loaded"][name], b), name
            assert torch.equal(resumed["after"][name], pp2[0]["after"][name]), name
        torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(pp2[0]["loss"]), rtol=1e-5, atol=0)

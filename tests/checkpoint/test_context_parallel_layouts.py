"""Context parallelism is a layout like the others: a CP2 save loads in one process and in TP2, a TP2 save in CP2,
and training goes on with the losses one process gets (within 1e-5 relative), the parameters bit-equal."""
import pytest
import torch

from megamoe import checkpoint
from megamoe.parallel import destroy_distributed
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import TrainState
from tests.checkpoint.common import Rank, config


def _params(rank: Rank) -> dict:
    return full_tensors({checkpoint.canonical_name(n, rank.cfg): p for n, p in rank.model.named_parameters()},
                        rank.topo)


def _two_ranks(root):
    """Each Rank rebuilds the process groups, so each is done with before the next is made."""
    out = {}
    cp = Rank(config(cp=2))
    assert checkpoint.load(f"{root}/one", cp.model, cp.optimizer, cp.cfg, cp.topo)["step"] == 2
    out["cp_loss_2"] = cp.train(2, 1)
    checkpoint.save(f"{root}/cp2", cp.model, cp.optimizer, TrainState(step=3), cp.cfg, cp.topo)
    out.update(cp_params_3=_params(cp), cp_loss_3=cp.train(3, 1))

    tp = Rank(config(tp=2))
    checkpoint.load(f"{root}/cp2", tp.model, tp.optimizer, tp.cfg, tp.topo)
    out["tp_loss_3"] = tp.train(3, 1)
    checkpoint.save(f"{root}/tp2", tp.model, tp.optimizer, TrainState(step=4), tp.cfg, tp.topo)
    out["tp_loss_4"] = tp.train(4, 1)

    back = Rank(config(cp=2))
    checkpoint.load(f"{root}/tp2", back.model, back.optimizer, back.cfg, back.topo)
    out["cp_loss_4"] = back.train(4, 1)
    return out


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_context_parallel_saves_load_in_other_layouts_and_back(tmp_path):
    root = str(tmp_path)
    try:
        one = Rank(config())
        one.train(0, 2)
        checkpoint.save(f"{root}/one", one.model, one.optimizer, TrainState(step=2), one.cfg, one.topo)
        one_loss_2 = one.train(2, 1)
    finally:
        destroy_distributed()

    r = run_on_ranks(_two_ranks, 2, args=(root,), timeout=400)[0]
    _close(r["cp_loss_2"], one_loss_2)  # CP2 continues the one-process run
    _close(r["tp_loss_3"], r["cp_loss_3"])  # TP2 continues the CP2 run
    _close(r["cp_loss_4"], r["tp_loss_4"])  # and CP2 the TP2 one

    try:
        one = Rank(config())
        assert checkpoint.load(f"{root}/cp2", one.model, one.optimizer, one.cfg, one.topo)["step"] == 3
        assert all(torch.equal(t, r["cp_params_3"][n]) for n, t in _params(one).items())
        _close(one.train(3, 1), r["cp_loss_3"])
    finally:
        destroy_distributed()

"""Checkpoints move between layouts and resume exactly. One 4-rank gloo job (the slow part) does it all:

- a TP1 x EP1 checkpoint (one process, 2 steps) loads into TP2 x EP2, directly and after an offline re-shard
  to TP2 x EP2, with the same logits; the sharding plan's boxes (the table offline re-sharding reads) are the live
  parallelize's, and the re-shard's stored chunks are exactly the ranks' boxes;
- TP2 x EP2 trains step 2, saves, trains step 3; new process groups and a ZeRO-1 optimizer load that save
  and repeat step 3: bit-equal loss (same layout). One process loads it too: bit-equal parameters, equal
  logits, and its step 3 loss within 1e-5 relative (another layout);
- PP2 x EP2 with ZeRO-1 (tied embeddings: the last stage's head copy is stored once, as the embedding) loads
  the TP1 checkpoint bit-exactly, trains, saves (each rank the optimizer state it owns); the saved tensors are
  the ones it holds, and one process resumes from them within 1e-5.
"""
import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint.convert import read_tensors, reshard
from megamoe.parallel import destroy_distributed
from megamoe.parallel.plan import layout_boxes
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import TrainState
from tests.checkpoint.common import Rank, config


def _full_params(rank: Rank) -> dict:
    named = {checkpoint.canonical_name(n, rank.cfg): p for n, p in rank.model.named_parameters()}
    return full_tensors(named, rank.topo)


def _split_rule_mismatches(rank: Rank) -> list:
    cfg, topo, bad = rank.cfg, rank.topo, []
    for name, p in rank.model.named_parameters():
        live = checkpoint.param_boxes(p, topo)
        table = layout_boxes(name, live.global_shape, cfg.model, topo.tp, topo.ep, topo.etp)
        if not all((glob, size) in table for _, glob, size in live.boxes):
            bad.append(name)
    return bad


def _chunks_match_boxes(rank: Rank, path: str) -> bool:
    """Every box this rank holds is exactly one stored chunk (what the re-shard promises)."""
    saved = checkpoint.read_metadata(checkpoint.resolve(path)).state_dict_metadata
    for key, entry in checkpoint.model_entries(rank.model, rank.cfg, rank.topo).items():
        chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in saved[key].chunks}
        if not all((tuple(g), tuple(s)) in chunks for _, g, s in entry.boxes):
            return False
    return True


def _four_ranks(root):
    """Each Rank rebuilds the model-parallel groups, so each is done with before the next is made."""
    out = {}
    rank = Rank(config(tp=2, ep=2))
    state = checkpoint.load(f"{root}/tp1", rank.model, rank.optimizer, rank.cfg, rank.topo)
    out.update(step=state["step"], logits_direct=rank.logits(), rules=_split_rule_mismatches(rank))
    rank.train(2, 1)
    checkpoint.save(f"{root}/tp2ep2", rank.model, rank.optimizer, TrainState(step=3), rank.cfg, rank.topo)
    out.update(params_3=_full_params(rank), logits_3=rank.logits(), loss_4=rank.train(3, 1))

    # New model-parallel process groups (init_distributed rebuilds them), a freshly initialised model, and a
    # ZeRO-1 optimizer that reads only the state of the parameters its rank owns.
    again = Rank(config(tp=2, ep=2, zero=True))
    assert checkpoint.load(f"{root}/tp2ep2", again.model, again.optimizer, again.cfg, again.topo)["step"] == 3
    out["resumed_loss_4"] = again.train(3, 1)

    resharded = Rank(config(tp=2, ep=2))
    checkpoint.load(f"{root}/tp1_as_tp2ep2", resharded.model, None, resharded.cfg, resharded.topo)
    out.update(logits_resharded=resharded.logits(),
               chunks_match=_chunks_match_boxes(resharded, f"{root}/tp1_as_tp2ep2"))

    pp = Rank(config(pp=2, ep=2, zero=True))
    checkpoint.load(f"{root}/tp1", pp.model, pp.optimizer, pp.cfg, pp.topo)
    out["pp_loaded"] = _full_params(pp)
    if pp.topo.is_last_stage:  # its own copy of the tied embedding read embedding.weight
        out["pp_tied_copy_ok"] = torch.equal(pp.model.lm_head.weight.detach(), out["pp_loaded"]["embedding.weight"])
    pp.train(2, 1)
    checkpoint.save(f"{root}/pp2ep2", pp.model, pp.optimizer, TrainState(step=3), pp.cfg, pp.topo)
    out.update(pp_trained=_full_params(pp), pp_loss_4=pp.train(3, 1))
    return out


@pytest.mark.slow
def test_layouts_load_each_other_and_resume_exactly(tmp_path):
    root = str(tmp_path)
    try:  # one process, TP1 x EP1: 2 steps, saved, and re-sharded offline for TP2 x EP2
        one = Rank(config())
        one.train(0, 2)
        checkpoint.save(f"{root}/tp1", one.model, one.optimizer, TrainState(step=2), one.cfg, one.topo)
        reshard(f"{root}/tp1", f"{root}/tp1_as_tp2ep2", tp=2, ep=2)
        tp1_logits, tp1_params = one.logits(), _full_params(one)
    finally:
        destroy_distributed()

    results = run_on_ranks(_four_ranks, 4, args=(root,), timeout=500)
    r0 = results[0]
    assert r0["step"] == 2 and r0["rules"] == [] and r0["chunks_match"]
    torch.testing.assert_close(r0["logits_direct"], tp1_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["logits_resharded"], tp1_logits, rtol=1e-5, atol=1e-6)
    assert r0["resumed_loss_4"] == r0["loss_4"]  # bit-exact in the same layout
    assert [r.get("pp_tied_copy_ok", True) for r in results] == [True] * 4
    assert all(torch.equal(r0["pp_loaded"][n], t) for n, t in tp1_params.items())
    pp_saved = read_tensors(f"{root}/pp2ep2")  # offline, no process group
    assert "lm_head.weight" not in pp_saved and pp_saved.keys() == r0["pp_trained"].keys()
    assert all(torch.equal(pp_saved[n], t) for n, t in r0["pp_trained"].items())

    try:  # back to one process: the TP2 x EP2 save, and its next step in this layout
        one = Rank(config())
        assert checkpoint.load(f"{root}/tp2ep2", one.model, one.optimizer, one.cfg, one.topo)["step"] == 3
        loaded = _full_params(one)
        assert all(torch.equal(loaded[n], t) for n, t in r0["params_3"].items())
        torch.testing.assert_close(one.logits(), r0["logits_3"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(one.train(3, 1)), torch.tensor(r0["loss_4"]), rtol=1e-5, atol=0)
    finally:
        destroy_distributed()
    try:  # and the PP2 x EP2 save, whose optimizer state ZeRO-1 ranks wrote in parts
        one = Rank(config())
        checkpoint.load(f"{root}/pp2ep2", one.model, one.optimizer, one.cfg, one.topo)
        torch.testing.assert_close(torch.tensor(one.train(3, 1)), torch.tensor(r0["pp_loss_4"]), rtol=1e-5, atol=0)
    finally:
        destroy_distributed()

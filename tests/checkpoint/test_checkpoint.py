"""One process: the training loop's --save/--save-interval/keep-last/--load with an exact resume; the latest
marker and atomicity; damaged, partial and mismatched checkpoints fail with errors that name file and problem.
"""
import os
import shutil

import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint import CheckpointError
from megamoe.config import config_from_dict
from megamoe.logging import read_metrics
from megamoe.model import build_model
from megamoe.parallel import destroy_distributed
from megamoe.training import TrainState, train
from megamoe.training.optimizer import build_optimizer
from tests.checkpoint.common import config


def _run(tmp, name, **checkpointing):
    cfg = config_from_dict({
        "model": {"pattern": "MEME", "d_model": 32, "d_state": 8, "num_experts": 4, "vocab_size": 64},
        "data": {"mock": True, "seq_length": 16},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6, "seed": 3,
                     "eval_interval": 3, "eval_iters": 1},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 2},
        "checkpoint": checkpointing,
        "logging": {"log_dir": str(tmp / name), "log_interval": 1, "tensorboard": False}})
    try:
        train(cfg)
    finally:
        destroy_distributed()
    return {r["step"]: r for r in read_metrics(str(tmp / name)) if "loss" in r}


def test_train_saves_every_interval_keeps_last_and_resumes_exactly(tmp_path):
    root = tmp_path / "ckpt"
    full = _run(tmp_path, "full", save=str(root), save_interval=2, keep_last=2)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000006", "latest"]  # iter_0000002 pruned
    assert (root / "latest").read_text() == "iter_0000006"
    marker = checkpoint.read_marker(str(root / "iter_0000004"))
    assert marker["train_state"]["step"] == 4 and marker["train_state"]["consumed_train_samples"] == 16

    resumed = _run(tmp_path, "resumed", load=str(root / "iter_0000004"))
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):  # bit-exact: model, AdamW moments and step, LR schedule, data position
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["lr"] == full[step]["lr"]
    assert resumed[6]["valid_loss"] == full[6]["valid_loss"]


@pytest.fixture
def saved(tmp_path):
    """A model-and-optimizer checkpoint of a small model, saved by one process without a process group."""
    cfg = config()
    model = build_model(cfg.model, seed=1)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    optimizer.step()
    root = tmp_path / "run"
    checkpoint.save(str(root), model, optimizer, TrainState(step=1), cfg, None)
    return dict(root=root, cfg=cfg, folder=root / "iter_0000001", model=model)


def _load(path, cfg, optimizer=True):
    model = build_model(cfg.model, seed=2)
    opt = build_optimizer(model, cfg.optimizer, torch.device("cpu")) if optimizer else None
    state = TrainState()
    checkpoint.load(str(path), model, opt, cfg, None, state)
    return state, model


def test_roundtrip_and_latest_marker(saved):
    state, model = _load(saved["root"], saved["cfg"])
    assert state.step == 1
    for (name, a), b in zip(saved["model"].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert checkpoint.load_config(str(saved["root"])).model == saved["cfg"].model


def test_save_is_atomic_latest_is_written_last(saved, monkeypatch):
    from megamoe.checkpoint import folder

    def crash(*_):
        raise KeyboardInterrupt("killed before the latest marker")

    monkeypatch.setattr(folder, "_write_latest", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(saved["root"]), saved["model"], None, TrainState(step=2), saved["cfg"], None)
    assert checkpoint.resolve(str(saved["root"])) == str(saved["folder"])  # still the previous one
    monkeypatch.undo()
    (saved["root"] / ".tmp_iter_0000009").mkdir()  # a stale folder of a killed save: never loadable
    with pytest.raises(CheckpointError, match="temporary folder of a save that did not finish"):
        checkpoint.resolve(str(saved["root"] / ".tmp_iter_0000009"))
    checkpoint.save(str(saved["root"]), saved["model"], None, TrainState(step=3), saved["cfg"], None)
    assert not (saved["root"] / ".tmp_iter_0000009").exists()
    assert checkpoint.resolve(str(saved["root"])).endswith("iter_0000003")


def test_killed_between_the_renames_of_a_second_save_of_one_step(saved, monkeypatch):
    """Saving step 1 again moves the old copy aside first; killed before the new one is in place, `latest`
    falls back to the old copy, and the next save of that step finishes the job."""
    from megamoe.checkpoint import folder
    replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        replace(src, dst)

    monkeypatch.setattr(folder.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(saved["root"]), saved["model"], None, TrainState(step=1), saved["cfg"], None)
    monkeypatch.undo()
    assert checkpoint.resolve(str(saved["root"])) == str(saved["root"] / ".old_iter_0000001")
    assert _load(saved["root"], saved["cfg"])[0].step == 1
    checkpoint.save(str(saved["root"]), saved["model"], None, TrainState(step=1), saved["cfg"], None)
    assert sorted(os.listdir(saved["root"])) == ["iter_0000001", "latest"]


def _damage(folder, how):
    shard = folder / "__0_0.distcp"
    if how == "missing .metadata":
        os.remove(folder / ".metadata")
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "deleted shard":
        os.remove(shard)
    elif how == "flipped byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "no marker":
        os.remove(folder / checkpoint.MARKER)
    elif how == "bad .metadata":
        (folder / ".metadata").write_bytes(b"not a pickle")


@pytest.mark.parametrize("how, message", [
    ("missing .metadata", r"iter_0000001/\.metadata is missing"),
    ("truncated shard", r"iter_0000001/__0_0\.distcp has \d+ bytes, the checkpoint recorded \d+ \(truncated"),
    ("deleted shard", r"iter_0000001/__0_0\.distcp is missing"),
    ("flipped byte", r"iter_0000001/__0_0\.distcp is corrupted"),
    ("no marker", r"iter_0000001/megamoe\.json is missing"),
    ("bad .metadata", r"iter_0000001/\.metadata has \d+ bytes"),
])
def test_damaged_checkpoints_name_the_file(saved, how, message):
    _damage(saved["folder"], how)
    with pytest.raises(CheckpointError, match=message):
        _load(saved["root"], saved["cfg"])


def test_unverified_load_still_catches_a_truncated_shard(saved):
    _damage(saved["folder"], "truncated shard")
    marker = saved["folder"] / checkpoint.MARKER
    marker.write_text(marker.read_text().replace('"files"', '"old_files"'))  # as if it recorded no sizes
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has \d+ bytes, fewer than the \d+ its records need"):
        _load(saved["root"], saved["cfg"])


def test_other_model_config_is_refused(saved):
    with pytest.raises(CheckpointError, match=r"megamoe\.json was saved with a different model config: "
                                              r"d_state: checkpoint 8 vs config 16"):
        _load(saved["root"], config(d_state=16))
    with pytest.raises(CheckpointError, match=r"vocab_size: checkpoint 64 vs config 128.*--model.vocab_size 64"):
        _load(saved["root"], config(vocab_size=128))


def test_missing_paths_and_markers(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve(str(tmp_path / "nowhere"))
    (saved["root"] / "latest").write_text("iter_0000042")
    with pytest.raises(CheckpointError, match=r"latest names 'iter_0000042', which does not exist"):
        checkpoint.resolve(str(saved["root"]))
    os.remove(saved["root"] / "latest")
    with pytest.raises(CheckpointError, match=r"has no latest marker; load one of its complete checkpoints"):
        checkpoint.resolve(str(saved["root"]))


def test_model_only(saved, tmp_path):
    state, model = _load(saved["root"], saved["cfg"], optimizer=False)
    assert torch.equal(model.embedding.weight, saved["model"].embedding.weight)
    root = tmp_path / "model_only"
    checkpoint.save(str(root), saved["model"], None, TrainState(step=5), saved["cfg"], None)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        _load(root, saved["cfg"])
    shutil.rmtree(root)

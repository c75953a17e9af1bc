"""A process killed (SIGKILL) in the middle of writing a checkpoint leaves nothing --load would take: the
previous `latest` still loads, the half-written folder is refused, and the next save clears it away."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint import CheckpointError
from megamoe.model import build_model
from megamoe.training import TrainState
from tests.checkpoint.common import config

CHILD = r"""
import os, signal, sys, torch
from megamoe import checkpoint
from megamoe.checkpoint import boxes
from megamoe.model import build_model
from megamoe.training.optimizer import build_optimizer
from megamoe.training import TrainState
from tests.checkpoint.common import config

root = sys.argv[1]
cfg = config()
model = build_model(cfg.model, seed=1)
optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
checkpoint.save(root, model, optimizer, TrainState(step=1), cfg, None)
torch.save(model.state_dict(), os.path.join(root, "expected.pt"))
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
resolve_data, written = boxes._BoxSavePlanner.resolve_data, []

def resolve_then_die(self, item):
    written.append(item)
    if len(written) == 20:  # some tensors are in the shard file already
        os.kill(os.getpid(), signal.SIGKILL)
    return resolve_data(self, item)

boxes._BoxSavePlanner.resolve_data = resolve_then_die
checkpoint.save(root, model, optimizer, TrainState(step=2), cfg, None)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, cwd=repo, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    partial = root / ".tmp_iter_0000002"
    assert partial.is_dir() and any(f.endswith(".distcp") for f in os.listdir(partial))
    assert not (root / "iter_0000002").exists()
    with pytest.raises(CheckpointError, match="temporary folder of a save that did not finish"):
        checkpoint.resolve(str(partial))
    assert checkpoint.resolve(str(root)) == str(root / "iter_0000001")

    cfg = config()
    model = build_model(cfg.model, seed=2)
    assert checkpoint.load(str(root), model, None, cfg, None)["step"] == 1
    expected = torch.load(root / "expected.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    checkpoint.save(str(root), model, None, TrainState(step=2), cfg, None)
    assert sorted(d for d in os.listdir(root) if d.startswith((".tmp", "iter"))) == ["iter_0000001", "iter_0000002"]

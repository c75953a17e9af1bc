"""Weights & Biases with Megatron's flags (--wandb-project, --wandb-exp-name, --wandb-save-dir), in offline mode:
the run file W&B writes holds the scalars metrics.jsonl (and TensorBoard) get, step by step, and the resolved
config; without wandb installed the run is refused before it starts, naming the extra."""
import glob
import importlib.util
import json
import struct

import pytest

from megamoe.config import build_config
from megamoe.errors import ConfigError
from megamoe.logging import read_metrics
from megamoe.parallel import destroy_distributed
from megamoe.training import train

ARGS = ["--model.pattern", "MEME", "--model.d_model", "32", "--model.d_state", "8", "--model.num_experts", "4",
        "--model.vocab_size", "128", "--data.mock", "true", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "6", "--log-interval", "2", "--lr", "1e-3"]


def wandb_records(run_file: str, pb) -> list:
    """The protobuf records of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks after a 7-byte header,
    each record cut in pieces with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    data, records, pos, piece = open(run_file, "rb").read(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            records.append(record)
            piece = b""
    return records


def test_wandb_offline_run_holds_the_logged_scalars_and_config(tmp_path, quiet_env, monkeypatch):
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = build_config(overrides=ARGS + ["--wandb-project", "megamoe-tests", "--wandb-exp-name", "tiny-moe-mamba",
                                         "--wandb-save-dir", str(tmp_path / "wb"), "--logging.log_dir",
                                         str(tmp_path / "run")])
    try:
        summary = train(cfg)
    finally:
        destroy_distributed()
    (run_file,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(run_file, pb)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "megamoe-tests" and run.display_name == "tiny-moe-mamba"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["pattern"] == "MEME" and config["training"]["train_iters"] == 6
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[items["_step"]] = items
    logged = read_metrics(summary["metrics"])
    assert sorted(history) == [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        scalars = {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        assert {"lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"} <= set(scalars)
        assert {k: history[r["step"]][k] for k in scalars} == pytest.approx(scalars, rel=1e-12)


def test_wandb_missing_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = build_config(overrides=ARGS + ["--wandb-project", "p"])
    with pytest.raises(ConfigError, match=r"not installed: pip install megamoe\[wandb\] \(or drop --wandb-project\)"):
        cfg.validate(1)

"""Offline tools on CPU without a process group: HF transformers export of Mamba models (same logits; every other
pattern: test_hf_export.py), consolidated safetensors, --inspect, the --target-layout checks, and that the files are
plain DCP checkpoints."""
import importlib.util
import os

import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint import CheckpointError
from megamoe.checkpoint.export import consolidate, load_consolidated
from megamoe.checkpoint.hf_export import export_hf
from megamoe.model import build_model
from megamoe.training import TrainState
from tests.checkpoint.common import VOCAB, config, probe_tokens

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_checkpoint.py")


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(root, cfg, seed=1, step=4):
    model = build_model(cfg.model, seed=seed)
    with torch.no_grad():  # move A_log, D, norms off their structured initial values
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    checkpoint.save(str(root), model, None, TrainState(step=step), cfg, None)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_export_gives_the_same_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    cfg = config(pattern="MMM", tie_embeddings=tie, proj_bias=not tie)
    model = _save(tmp_path / "ckpt", cfg)
    assert _tool().main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.MambaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vocab_size == VOCAB and hf.config.num_hidden_layers == 3
    assert (hf.lm_head.weight is hf.backbone.embeddings.weight) == tie
    tokens = probe_tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_hf_export_refuses_a_tokenizer_that_is_not_the_models(tmp_path, tiny_corpus):
    cfg = config()
    cfg.data.tokenizer_model = str(tmp_path / "gone.model")
    _save(tmp_path / "ckpt", cfg)
    with pytest.raises(CheckpointError, match=r"the checkpoint's tokenizer .*gone.model does not exist here; pass "
                                              r"--tokenizer-model PATH"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"has 1024 pieces, more than the model's vocabulary of 64"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), tokenizer_model=tiny_corpus["tokenizer"])
    assert not (tmp_path / "hf").exists()


def test_consolidated_roundtrip_and_plain_dcp(tmp_path):
    model = _save(tmp_path / "ckpt", config())
    consolidate(str(tmp_path / "ckpt"), str(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "one")) == ["config.yaml", "model.safetensors"]
    again, cfg = load_consolidated(str(tmp_path / "one"))
    assert cfg.model == config().model
    tokens = probe_tokens()
    with torch.no_grad():
        assert torch.equal(again.eval()(tokens).logits, model(tokens).logits)
    # torch's own DCP tool reads the checkpoint: the files are a plain DCP checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(checkpoint.resolve(str(tmp_path / "ckpt")), str(tmp_path / "plain.pt"))
    plain = torch.load(tmp_path / "plain.pt")
    assert torch.equal(plain["model.layers.0.mixer.in_proj.weight"], model.layers["0"].mixer.in_proj.weight)


def test_inspect_and_target_layout_checks(tmp_path, capsys):
    _save(tmp_path / "ckpt", config())
    tool = _tool()
    assert tool.main([str(tmp_path / "ckpt"), "--inspect"]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "saved layout: TP 1 x PP 1 x EP 1 (ETP 1) x DP 1 on 1 ranks" in out
    assert any(line.split()[:3] == ["model.layers.0.mixer.in_proj.weight", "float32", "(128,"]
               for line in out.splitlines())
    assert tool.main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "x"), "--target-layout", "tp=1,ep=3"]) == 1
    assert "num_experts=4 is not divisible by --expert-model-parallel-size=3" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "x"), "--target-layout", "tp=3"]) == 1
    assert "does not divide" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "y"), "--target-layout", "tp=1,ep=4"]) == 0
    capsys.readouterr()
    assert tool.main([str(tmp_path / "y"), "--inspect"]) == 0
    out = capsys.readouterr().out
    assert "saved layout: TP 1 x PP 1 x EP 4 (ETP 1) x DP 4 on 4 ranks" in out and "converted from" in out
    assert any("model.layers.1.moe.experts.w1" in line and line.endswith("4 chunks") for line in out.splitlines())

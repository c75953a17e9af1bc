"""`tools/convert_checkpoint.py --from-hf`: transformers' MambaForCausalLM folders (the public state-spaces layout,
here small random models saved locally, single-file and sharded) and megamoe's own HF exports become megamoe
checkpoints in any layout; megamoe -> HF -> megamoe gives identical tensors (the routing options' expert biases,
shared experts and dense fallbacks too); a Mamba upcycles into MoE-Mamba."""
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every folder is local

import pytest  # noqa: E402
import torch  # noqa: E402

from megamoe import checkpoint  # noqa: E402
from megamoe.checkpoint.convert import read_tensors  # noqa: E402
from megamoe.checkpoint.hf_import import import_hf  # noqa: E402
from megamoe.errors import CheckpointError  # noqa: E402
from megamoe.inference import load_for_inference  # noqa: E402
from megamoe.model import build_model  # noqa: E402
from megamoe.training import TrainState  # noqa: E402
from tests.checkpoint.common import ROUTINGS, config, routed_model  # noqa: E402

transformers = pytest.importorskip("transformers")

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_checkpoint.py")


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public_mamba(folder, tie=True, shard=None, pickle=False):
    """A randomly initialised transformers MambaForCausalLM saved as the state-spaces checkpoints are."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2,
                                   conv_kernel=4, tie_word_embeddings=tie, use_bias=not tie)
    hf = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # off the structured initial values (A_log, D, norms)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    hf.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if pickle:  # the older checkpoints' pytorch_model.bin
        torch.save(hf.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        os.remove(os.path.join(folder, "model.safetensors"))
    return hf


@pytest.mark.parametrize("tie,shard,pickle", [(True, None, False), (False, "40KB", False), (True, None, True)],
                         ids=["tied", "untied_sharded", "pytorch_model_bin"])
def test_public_mamba_layout_imports_with_the_same_logits(tmp_path, capsys, tie, shard, pickle):
    hf = _public_mamba(str(tmp_path / "hf"), tie, shard, pickle)
    if shard:
        assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    assert _tool().main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                         "--target-layout", "tp=2"]) == 0
    assert "iter_0000000" in capsys.readouterr().out
    marker = checkpoint.read_marker(str(tmp_path / "ck"))
    assert marker["layout"]["tp"] == 2 and marker["optimizer"] is False and marker["step"] == 0
    model, cfg = load_for_inference(str(tmp_path / "ck"))
    assert cfg.model.pattern == "MMM" and cfg.model.d_inner == 64 and cfg.model.tie_embeddings == tie
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, hf(tokens).logits, rtol=0, atol=1e-5)


def _round_trip(tmp_path, model, cfg, layout):
    """megamoe -> HF -> megamoe (in `layout`) gives the same tensors, buffers included, and the same model config."""
    checkpoint.save(str(tmp_path / "ck"), model, None, TrainState(step=5), cfg, None)
    tool = _tool()
    assert tool.main([str(tmp_path / "ck"), "--output", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert tool.main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"),
                      "--target-layout", layout]) == 0
    before, after = read_tensors(str(tmp_path / "ck")), read_tensors(str(tmp_path / "back"))
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint.load_config(str(tmp_path / "back")).model == cfg.model
    return before


@pytest.mark.parametrize("pattern", ["MEAF", "MMM"], ids=["remote_code", "native_mamba"])
def test_megamoe_hf_megamoe_round_trip_is_identical(tmp_path, pattern):
    cfg = config(pattern=pattern, tie_embeddings=pattern == "MMM")
    model = build_model(cfg.model, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _round_trip(tmp_path, model, cfg, "tp=2,ep=2")


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_tensors_round_trip_identically(tmp_path, name):
    model, cfg = routed_model(name)
    tensors = _round_trip(tmp_path, model, cfg, "ep=2" if cfg.model.mamba_moe_projections else "tp=2,ep=2")
    for part, key in (("expert_bias", "router_enable_expert_bias"), (".shared.", "shared_expert_intermediate_size"),
                      (".fallback.", "mamba_moe_dense_fallback")):
        assert any(part in n for n in tensors) == bool(ROUTINGS[name].get(key))


def test_mamba_upcycles_into_moe_mamba(tmp_path):
    hf = _public_mamba(str(tmp_path / "hf"))
    folder = import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), ep=2,
                       model_overrides={"pattern": "MEMEME", "num_experts": "4", "capacity_factor": "0"})
    tensors = read_tensors(folder)
    source = hf.state_dict()
    for i, j in ((0, 0), (1, 2), (2, 4)):  # the Mamba layers go to the M blocks, in order
        for name in ("mixer.in_proj.weight", "mixer.A_log", "norm.weight"):
            assert torch.equal(tensors[f"layers.{j}.{name}"], source[f"backbone.layers.{i}.{name}"])
    assert tensors["layers.1.moe.experts.w1"].shape == (4, 32, 96)  # new: d_expert = 3 x d_model
    model, cfg = load_for_inference(folder)
    assert cfg.model.pattern == "MEMEME" and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_what_import_refuses(tmp_path, capsys):
    _public_mamba(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"new pattern 'MEME' has 2 Mamba layers, the source 3; give a pattern "
                                              r"with 3 M"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "x"), model_overrides={"pattern": "MEME"})
    capsys.readouterr()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert _tool().main(["--from-hf", str(tmp_path / "gpt2"), "--output", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model_type 'gpt2'" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")

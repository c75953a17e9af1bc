"""The LM: layer patterns and the paper's variants, per-block initialisation, losses, parameter counts."""
import glob
import os

import pytest
import torch

from megamoe.config import ModelConfig, block_kinds, build_config
from megamoe.model import MambaLM, build_model, count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# The paper's Table 1 (docs/paper.md): non-embedding parameters (total, active), in millions.
PAPER_SIZES = {"mamba_25m": (27, 27), "moe_mamba_25m": (542, 26), "transformer_moe_25m": (545, 25),
               "transformer_25m": (25, 25), "mamba_100m": (121, 121), "moe_mamba_100m": (2439, 117),
               "transformer_moe_100m": (2454, 114), "parallel_moe_mamba_25m": (542, 26)}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_configs_match_table1_sizes(name):
    cfg = build_config(os.path.join(ROOT, "examples", "paper", f"{name}.yaml"), ["--model.vocab_size", "50257"])
    counts = count_parameters(cfg.model)
    total, active = PAPER_SIZES[name]
    assert counts["total_non_embedding"] / 1e6 == pytest.approx(total, rel=0.05)
    assert counts["active_non_embedding"] / 1e6 == pytest.approx(active, rel=0.05)


def test_every_example_config_is_valid():
    paths = glob.glob(os.path.join(ROOT, "examples", "**", "*.yaml"), recursive=True)
    assert len(paths) >= 9
    for path in paths:
        cfg = build_config(path, ["--data.mock", "true"])
        cfg.model.validate()


def test_block_kinds_and_parallel_moe_mamba():
    assert block_kinds(ModelConfig(pattern="MEM|E")) == ["M", "E", "M", "E"]
    assert block_kinds(ModelConfig(pattern="MEMEAF", parallel_moe=True)) == ["ME", "ME", "A", "F"]
    model = build_model(ModelConfig(pattern="MEME", parallel_moe=True, d_model=32, vocab_size=64, num_experts=2))
    block = model.layers["0"]
    assert list(model.layers) == ["0", "1"] and hasattr(block, "mixer") and hasattr(block, "moe")


def test_parallel_block_sums_both_sublayers():
    model = build_model(ModelConfig(pattern="ME", parallel_moe=True, d_model=16, vocab_size=32, num_experts=2,
                                    capacity_factor=0))
    block = model.layers["0"]
    h = torch.randn(2, 5, 16)
    x = block.norm(h)
    torch.testing.assert_close(block(h), h + block.mixer(x) + block.moe(x))


def test_moe_inside_mamba_every_other_layer():
    cfg = ModelConfig(pattern="MMMM", d_model=16, vocab_size=32, num_experts=4,
                      mamba_moe_projections=["conv", "output"], mamba_moe_every=2)
    model = build_model(cfg)
    plain, moe = model.layers["0"].mixer, model.layers["1"].mixer
    assert hasattr(plain, "in_proj") and not plain.moe_projections
    assert moe.moe_projections == ("conv", "output")
    assert moe.conv_proj.experts.w1.shape == (4, 16, 32)  # linear experts of the projection's shape
    assert isinstance(moe.gate_proj, torch.nn.Linear) and moe.out_proj.experts.w1.shape == (4, 32, 16)
    tokens = torch.randint(0, 32, (2, 6))
    out = model(tokens, labels=tokens)
    assert out.moe_stats["tokens_per_expert"].shape == (4, 4)  # 2 MoE layers x 2 projections each
    out.loss.backward()
    assert moe.conv_proj.router.weight.grad.abs().sum() > 0


def test_pipeline_stage_has_the_whole_models_weights():
    cfg = ModelConfig(pattern="MEMEAF", d_model=16, vocab_size=32, num_experts=2)
    full = build_model(cfg, seed=7)
    first = build_model(cfg, seed=7, blocks=[0, 1, 2], post_process=False)
    last = build_model(cfg, seed=7, blocks=[3, 4, 5], pre_process=False)
    stage_params = {**dict(first.named_parameters()), **dict(last.named_parameters())}
    for name, p in full.named_parameters():
        torch.testing.assert_close(stage_params[name], p, rtol=0, atol=0)
    # tied embeddings: the last stage's head starts equal to the first stage's embedding
    torch.testing.assert_close(last.lm_head.weight, first.embedding.weight, rtol=0, atol=0)
    tokens = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(last.stage_forward(first.stage_forward(tokens)), full.stage_forward(tokens))


def test_seed_changes_weights_and_global_rng_is_untouched():
    cfg = ModelConfig(pattern="ME", d_model=16, vocab_size=32, num_experts=2)
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    a = build_model(cfg, seed=1)
    assert torch.rand(1) == before
    b = build_model(cfg, seed=2)
    assert not torch.equal(a.layers["0"].mixer.in_proj.weight, b.layers["0"].mixer.in_proj.weight)


def test_loss_mask_and_losses():
    cfg = ModelConfig(pattern="ME", d_model=16, vocab_size=32, num_experts=2, tie_embeddings=False)
    model = build_model(cfg)
    assert model.lm_head.weight is not model.embedding.weight
    tokens = torch.randint(0, 32, (2, 6))
    labels = torch.randint(0, 32, (2, 6))
    mask = torch.zeros(2, 6)
    mask[:, :3] = 1
    out = model(tokens, labels=labels, loss_mask=mask)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :3].reshape(-1, 32), labels[:, :3].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.aux_loss.item() > 0 and not out.aux_loss.requires_grad


def test_vocab_must_be_resolved():
    with pytest.raises(ValueError, match="vocab_size must be resolved"):
        MambaLM(ModelConfig())


def test_counts_with_embeddings():
    cfg = ModelConfig(pattern="ME", d_model=16, vocab_size=100, num_experts=4, d_expert=48)
    counts = count_parameters(cfg)
    assert counts["embedding"] == 1600
    assert counts["experts"] == 4 * 2 * 16 * 48
    assert counts["total"] - counts["active"] == 3 * 2 * 16 * 48
    untied = count_parameters(ModelConfig(pattern="ME", d_model=16, vocab_size=100, num_experts=4, d_expert=48,
                                          tie_embeddings=False))
    assert untied["embedding"] == 3200 and untied["total_non_embedding"] == counts["total_non_embedding"]


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs (what activation recompute cuts)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_recomputed_blocks_give_the_same_gradients_and_keep_less():
    cfg = ModelConfig(pattern="MEMEAF", d_model=32, d_state=8, vocab_size=64, num_experts=4, num_heads=4,
                      capacity_factor=0.75, z_loss_weight=1e-3)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        model = build_model(cfg, seed=3)
        calls = []
        for block in model.layers.values():
            block.recompute = recompute
            block.norm.register_forward_hook(lambda *_: calls.append(1))
        out, kept = _saved_bytes(lambda: model(tokens, labels=tokens))
        forwards = len(calls)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad for n, p in model.named_parameters()}, kept,
                        forwards, len(calls)))
    (loss, grads, kept, fwd, total), (loss_r, grads_r, kept_r, fwd_r, total_r) = results
    assert loss_r == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert (fwd, total) == (6, 6) and (fwd_r, total_r) == (6, 12)  # each block ran again in backward
    assert kept_r < 0.25 * kept  # only block inputs (and the head's activations) were kept

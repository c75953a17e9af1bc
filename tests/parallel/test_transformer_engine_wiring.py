"""megamoe's Transformer Engine path, checked against a stand-in TE (tests/parallel/fake_te): the TE linears
hold the right shards with the plain model's parameter names, compute the same function under TP=2, and
fp8_autocast gets the configured recipe. Real TE needs a GPU; this checks how megamoe uses its interface."""
import os
import sys

import pytest
import torch

from megamoe.config import ConfigError, config_from_dict
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.parallel.te import FastPaths, fast_paths, fp8_context
from megamoe.testing import full_tensors, run_on_ranks

FAKE_TE = os.path.join(os.path.dirname(__file__), "fake_te")


def _cfg(tp=1, **training):
    return config_from_dict({"model": {"pattern": "MEAF", "d_model": 32, "d_state": 8, "num_experts": 4,
                                       "vocab_size": 64, "num_heads": 4, "capacity_factor": 0},
                             "parallel": {"tensor_model_parallel_size": tp}, "data": {"mock": True, "seq_length": 16},
                             "training": training})


def _logits_and_params(tp, use_te):
    te = None
    if use_te:  # only in the spawned ranks, after megatron-core was imported (it must not see the stand-in)
        sys.path.insert(0, FAKE_TE)
        import transformer_engine.pytorch as te
    cfg = _cfg(tp)
    topo = init_distributed(cfg.parallel)
    set_seed(0)
    model = build_parallel_model(cfg, topo, FastPaths(te=te))
    kinds = sorted({type(m).__module__ for m in model.modules()
                    if hasattr(m, "weight") and "Linear" in type(m).__name__})
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(tokens, labels=tokens)
    out.lm_loss.backward()
    names = sorted(n for n, _ in model.named_parameters())
    grads = full_tensors(dict(model.named_parameters()), topo, grads=True)
    return out.lm_loss.item(), names, grads, kinds


def test_te_linears_under_tp2_compute_the_same_model():
    ref_loss, ref_names, ref_grads, _ = _logits_and_params(1, False)
    destroy_distributed()
    for loss, names, grads, kinds in run_on_ranks(_logits_and_params, 2, args=(2, True)):
        assert "transformer_engine.pytorch" in kinds
        assert names == ref_names  # TE layers keep the plain model's parameter names
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fp8_context_uses_the_configured_recipe(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_TE)
    import transformer_engine.pytorch as te
    cfg = _cfg(fp8="e4m3", fp8_amax_history_len=16, fp8_margin=1)
    with fp8_context(cfg):
        pass
    recipe = te.FP8_RECIPES[-1]
    assert (recipe.fp8_format.value, recipe.amax_history_len, recipe.margin) == ("e4m3", 16, 1)


def _amax_group_ranks(parallel):
    sys.path.insert(0, FAKE_TE)
    import torch.distributed as dist
    import transformer_engine.pytorch as te
    cfg = _cfg(fp8="e4m3")
    cfg.parallel.pipeline_model_parallel_size = parallel.get("pp", 1)
    topo = init_distributed(cfg.parallel)
    with fp8_context(cfg, topo):
        pass
    return dist.get_process_group_ranks(te.FP8_GROUPS[-1])


def test_fp8_amax_is_reduced_within_a_pipeline_stage():
    """Delayed scaling all-reduces amaxes: over DP here, but never across pipeline stages (other layers)."""
    assert run_on_ranks(_amax_group_ranks, 2, args=({"pp": 2},)) == [[0], [1]]
    assert run_on_ranks(_amax_group_ranks, 2, args=({},)) == [[0, 1], [0, 1]]


def test_fp8_without_transformer_engine_says_so():
    cfg = _cfg(fp8="hybrid")
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        fast_paths(cfg, torch.device("cpu"))
    experts = "grouped GEMM (torch grouped_mm)" if hasattr(torch.nn.functional, "grouped_mm") else "a loop"
    assert fast_paths(_cfg(), torch.device("cpu")).describe().startswith(
        f"linears: megatron-core / PyTorch; norms: PyTorch; experts: {experts}")
    assert fast_paths(_cfg(moe_grouped_gemm=False), torch.device("cpu")).describe().endswith(
        "experts: a loop over local experts")

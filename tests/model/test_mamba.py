"""The Mamba-1 mixer: same output as HF transformers' MambaMixer on shared weights; recurrent decoding."""
import pytest
import torch

from megamoe.model import MambaMixer


def _hf_mixer(mixer: MambaMixer):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer
    cfg = transformers.MambaConfig(hidden_size=mixer.d_model, state_size=mixer.d_state,
                                   intermediate_size=mixer.d_inner, conv_kernel=mixer.d_conv,
                                   time_step_rank=mixer.dt_rank, use_bias=False, use_conv_bias=True,
                                   use_mambapy=False, num_hidden_layers=1)
    hf = HFMambaMixer(cfg, layer_idx=0).eval()
    missing, unexpected = hf.load_state_dict(mixer.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf


@pytest.mark.parametrize("d_model, length", [(32, 17), (48, 64)])
def test_matches_hf_transformers_slow_path(d_model, length):
    torch.manual_seed(0)
    mixer = MambaMixer(d_model, d_state=16, d_conv=4, expand=2).eval()
    hf = _hf_mixer(mixer)
    h = torch.randn(2, length, d_model)
    with torch.no_grad():
        ours, theirs = mixer(h), hf(h)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_reference_initialisation():
    torch.manual_seed(0)
    mixer = MambaMixer(64, d_state=16, expand=2, dt_min=0.001, dt_max=0.1)
    assert mixer.dt_rank == 4 and mixer.d_inner == 128
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(128, 1))
    torch.testing.assert_close(mixer.D, torch.ones(128))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert set(n for n, _ in mixer.named_parameters()) == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "D", "out_proj.weight"}


def test_recurrent_decoding_equals_full_sequence():
    torch.manual_seed(1)
    mixer = MambaMixer(32, d_state=8, d_conv=4).eval()
    h = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.allocate_inference_cache(2)
        prefix = mixer.prefill(h[:, :5], cache)
        steps = [mixer.step(h[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(prefix, full[:, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_short_prefill_then_steps():
    torch.manual_seed(2)
    mixer = MambaMixer(16, d_state=4, d_conv=4).eval()
    h = torch.randn(1, 6, 16)
    with torch.no_grad():
        full = mixer(h)
        cache = mixer.allocate_inference_cache(1)
        outs = [mixer.prefill(h[:, :2], cache)] + [mixer.step(h[:, t:t + 1], cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)

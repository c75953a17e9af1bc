"""--fp16: the loss scale follows Megatron's dynamic rules, an overflowing step changes no weight, and a
training run in float16 learns and resumes with its scale."""
import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint.folder import read_marker
from megamoe.config import ConfigError, config_from_dict
from megamoe.logging import read_metrics
from megamoe.parallel import destroy_distributed, init_distributed, set_seed
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.testing import full_tensors, run_on_ranks
from megamoe.training import make_runner, train, train_step
from megamoe.training.loss_scale import LossScaler
from megamoe.training.optimizer import build_optimizer
from megamoe.training.schedule import lr_at


def test_dynamic_scale_backs_off_after_hysteresis_and_grows_after_a_window():
    scaler = LossScaler(1024.0, min_scale=256.0, window=3, hysteresis=2)
    scaler.update(overflow=True)
    assert scaler.scale == 1024.0  # the first overflow is absorbed by hysteresis
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    for _ in range(5):
        scaler.update(overflow=True)
    assert scaler.scale == 256.0  # never below --min-loss-scale
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 512.0 and scaler.hysteresis_left == 2
    restored = LossScaler(1.0)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    constant = LossScaler(1.0, constant=128.0)
    constant.update(overflow=True)
    assert constant.scale == 128.0


def _config(tmp_path, corpus=None, **training):
    data = ({"data_path": [corpus["prefix"]], "tokenizer_model": corpus["tokenizer"], "split": "100,0,0"}
            if corpus else {"mock": True})
    return config_from_dict({
        "model": {"pattern": "MEME", "d_model": 32, "d_state": 8, "num_experts": 4,
                  "vocab_size": None if corpus else 64},
        "data": {"seq_length": 32, **data},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0, "fp16": True, **training},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 0},
        "logging": {"log_dir": str(tmp_path / "run"), "log_interval": 1}})


def test_an_overflowing_step_is_skipped_and_changes_nothing(tmp_path, quiet_env):
    cfg = _config(tmp_path, initial_loss_scale=2.0 ** 60, hysteresis=1)  # float16 gradients overflow
    try:
        topo = init_distributed(cfg.parallel)
        set_seed(0)
        model = build_parallel_model(cfg, topo)
        runner, optimizer = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
        scaler = LossScaler.from_config(cfg.training)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(2, 32))
        record = train_step(runner, optimizer, [batch, batch], cfg, topo, lr=1e-2, scaler=scaler)
        assert record["skipped_step"] == 1 and record["loss_scale"] == 2.0 ** 60
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert scaler.scale == 2.0 ** 59
    finally:
        destroy_distributed()


def test_skipped_steps_are_counted_and_do_not_advance_the_lr(tmp_path, quiet_env):
    """Megatron steps its LR scheduler only after a successful update: warmup is not eaten by the overflowing
    steps that find the loss scale."""
    cfg = _config(tmp_path, initial_loss_scale=2.0 ** 40, hysteresis=1, train_iters=24)
    cfg.optimizer.lr_warmup_iters = 4
    cfg.checkpoint.save = str(tmp_path / "ckpt")
    try:
        records = read_metrics(train(cfg)["metrics"])
    finally:
        destroy_distributed()
    skipped = [r["skipped_step"] for r in records]
    first_update = skipped.index(0)
    assert first_update >= 3 and sum(skipped) == first_update  # overflows until the scale has come down
    assert [r["skipped_steps"] for r in records] == skipped  # logged every step: the interval's count is the step's
    want = [lr_at(r["step"] - 1 - sum(skipped[:i]), cfg.optimizer, 24) for i, r in enumerate(records)]
    assert [r["lr"] for r in records] == pytest.approx(want)
    assert records[first_update]["lr"] == pytest.approx(3e-3 / 4)  # the first update gets warmup's first LR
    saved = read_marker(checkpoint.resolve(str(tmp_path / "ckpt")))["train_state"]
    assert saved["skipped_steps"] == first_update


def _step_grads(tmp_path, fp16, pp=1):
    """One step's gradients (gathered to full shape), in fp16 with loss scale 2^10 or in fp32."""
    cfg = _config(tmp_path, fp16=fp16, initial_loss_scale=2.0 ** 10)
    cfg.optimizer.clip_grad = 0.0  # compare the gradients themselves
    cfg.parallel.pipeline_model_parallel_size = pp
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(2, 32)) for t in tokens.split(2)]
    topo = init_distributed(cfg.parallel)
    set_seed(0)
    model = build_parallel_model(cfg, topo)
    runner, optimizer = make_runner(model, cfg, topo), build_optimizer(model, cfg.optimizer, topo.device)
    record = train_step(runner, optimizer, batches, cfg, topo, lr=1e-2, scaler=LossScaler.from_config(cfg.training))
    return record, full_tensors(dict(model.named_parameters()), topo, grads=True)


@pytest.mark.parametrize("pp", [1, 2])
def test_fp16_gradients_are_unscaled_to_the_fp32_ones(tmp_path, quiet_env, pp):
    try:
        _, want = _step_grads(tmp_path, fp16=False)
    finally:
        destroy_distributed()
    for record, grads in run_on_ranks(_step_grads, pp, args=(tmp_path, True, pp)):
        assert record["skipped_step"] == 0 and record["loss_scale"] == 2.0 ** 10
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=0.05, atol=2e-3 * g.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


def test_fp16_run_learns_as_fp32_does_and_resumes_with_its_scale(tiny_corpus, tmp_path, quiet_env):
    try:
        fp32 = read_metrics(train(_config(tmp_path / "fp32", tiny_corpus, train_iters=30, fp16=False))["metrics"])
        destroy_distributed()
        cfg = _config(tmp_path, tiny_corpus, train_iters=30, initial_loss_scale=2.0 ** 12, loss_scale_window=10)
        cfg.checkpoint.save = str(tmp_path / "ckpt")
        records = read_metrics(train(cfg)["metrics"])
        assert not any(r["skipped_step"] for r in records)
        # doubled after every 10 steps without overflow
        assert [r["loss_scale"] for r in records] == [2.0 ** 12] * 10 + [2.0 ** 13] * 10 + [2.0 ** 14] * 10
        assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.3
        assert records[-1]["lm_loss"] == pytest.approx(fp32[-1]["lm_loss"], abs=0.05)  # fp16 tracks fp32
        saved = read_marker(checkpoint.resolve(str(tmp_path / "ckpt")))["train_state"]["loss_scaler"]
        assert saved["scale"] == 2.0 ** 15  # the update after the last step
        destroy_distributed()
        resumed = _config(tmp_path, tiny_corpus, train_iters=31, initial_loss_scale=1.0)  # the checkpoint's wins
        resumed.checkpoint.load = str(tmp_path / "ckpt")
        record = read_metrics(train(resumed)["metrics"])[-1]
        assert (record["step"], record["loss_scale"]) == (31, 2.0 ** 15)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("training, message", [
    ({"fp16": True, "bf16": True}, "--fp16 and --bf16 are both set"),
    ({"fp16": True, "loss_scale": 0.0}, "--loss-scale=0.0 must be > 0"),
    ({"fp16": True, "hysteresis": 0}, "must be >= 1"),
    ({"fp16": True, "min_loss_scale": 2.0 ** 20, "initial_loss_scale": 2.0 ** 16}, "is above --initial-loss-scale"),
])
def test_bad_fp16_options(tmp_path, training, message):
    cfg = _config(tmp_path, **training)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1)

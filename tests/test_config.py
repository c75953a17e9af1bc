"""Config: YAML + command line, Megatron flag names, and validation that names the key and the fix."""
import pytest

from megamoe.config import Config, ConfigError, build_config, config_from_dict


def _valid(**sections) -> Config:
    cfg = config_from_dict({"data": {"mock": True}, **sections})
    return cfg


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 128\n  pattern: MEME\ntraining:\n  train_iters: 7\n")
    cfg = build_config(str(path), ["--model.d_model=64", "--train-iters", "9", "--lr", "3e-4", "--bf16",
                                   "--tensor-model-parallel-size", "2", "--data-path", "0.3", "a", "0.7", "b"])
    assert cfg.model.d_model == 64 and cfg.model.pattern == "MEME"
    assert cfg.training.train_iters == 9 and cfg.training.bf16 is True
    assert cfg.optimizer.lr == 3e-4 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"] and cfg.data.prefixes() == ["a", "b"]
    assert build_config(None, ["--moe-grouped-gemm", "false"]).training.moe_grouped_gemm is False
    assert build_config(None, ["--moe-grouped-gemm"]).training.moe_grouped_gemm is True


def test_megatron_reliability_flags():
    cfg = build_config(None, ["--no-check-for-nan-in-loss-and-grad", "--check-for-spiky-loss", "--rerun-mode",
                              "validate_results", "--async-save", "--distributed-timeout-minutes", "10"])
    assert cfg.training.check_for_nan_in_loss_and_grad is False and cfg.training.check_for_spiky_loss is True
    assert cfg.training.rerun_mode == "validate_results" and cfg.checkpoint.async_save is True
    assert cfg.parallel.distributed_timeout_minutes == 10
    assert build_config(None, []).training.check_for_nan_in_loss_and_grad is True  # on by default, as Megatron


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(None, ["--model.mamba_moe_projections", "conv", "gate", "--seq-length", "64"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert build_config(str(path)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--model.d_modle", "3"], "unknown config key '--model.d_modle'.*did you mean model.d_model"),
    (["--tensor-model-paralel-size", "2"], "did you mean --tensor-model-parallel-size"),
    (["--model.d_model", "big"], "model.d_model='big' is not a valid int"),
    (["--lr"], "--lr takes one value"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_command_line(argv, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, argv)


def test_unknown_yaml_section_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  d_model: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle' in .*bad.yaml.*did you mean model"):
        build_config(str(path))
    path.write_text("model:\n  experts: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.experts'"):
        build_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("overrides, world, message", [
    ({"parallel": {"tensor_model_parallel_size": 3}}, 3, "does not divide the Mamba d_inner"),
    ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "world size 3 is not divisible by"),
    ({"parallel": {"expert_model_parallel_size": 3}}, 3, r"num_experts=8 is not divisible by "
                                                         r"--expert-model-parallel-size=3.*\[1, 2, 4, 8\]"),
    ({"model": {"num_experts": 42}, "parallel": {"expert_model_parallel_size": 4}}, 4,
     r"sizes that work: \[1, 2, 3, 6, 7, 14, 21, 42\]"),
    ({"training": {"global_batch_size": 6, "micro_batch_size": 4}}, 1, "--global-batch-size=6 is not divisible"),
    ({"training": {"global_batch_size": 8, "micro_batch_size": 4}}, 4, r"data-parallel size \(4\) = 16"),
    ({"model": {"pattern": "MXE"}}, 1, r"unknown layer letters \['X'\]"),
    ({"model": {"pattern": "AE", "num_heads": 3}}, 1, "not divisible by model.num_heads"),
    ({"model": {"vocab_size": 1001}, "parallel": {"tensor_model_parallel_size": 2}}, 2,
     "does not divide model.vocab_size=1001"),
    ({"model": {"pattern": "ME"}, "parallel": {"pipeline_model_parallel_size": 4}}, 4, "fewer than the 4 pipeline"),
    ({"optimizer": {"lr": 0}}, 1, "--lr=0.0 must be > 0"),
    ({"parallel": {"pipeline_model_parallel_size": 2}, "training": {"global_batch_size": 4, "micro_batch_size": 4}},
     2, r"1F1B needs at least as many micro-batches .* = 1 < --pipeline-model-parallel-size 2"),
    ({"parallel": {"expert_tensor_parallel_size": 2, "tensor_model_parallel_size": 4}}, 4,
     "--expert-tensor-parallel-size=2: use 1 .* or the tensor-parallel size 4"),
    ({"model": {"mamba_moe_projections": ["conv"]}, "parallel": {"tensor_model_parallel_size": 2}}, 2,
     "mamba_moe_projections .* needs --tensor-model-parallel-size 1"),
    ({"parallel": {"sequence_parallel": True, "tensor_model_parallel_size": 2}, "data": {"seq_length": 33}}, 2,
     "--seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    ({"parallel": {"context_parallel_size": 2}, "data": {"seq_length": 33}}, 2,
     "--context-parallel-size 2 splits every sequence: --seq-length 33 is not divisible by it"),
    ({"parallel": {"context_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True},
      "data": {"seq_length": 34}}, 4, "--seq-length 34 is not divisible by --tensor-model-parallel-size 2 x "
                                     "--context-parallel-size 2"),
    ({"parallel": {"context_parallel_size": 8}, "data": {"seq_length": 16}}, 8,
     "slice of 2 tokens is shorter than the conv's halo"),
    ({"parallel": {"context_parallel_size": 2, "tensor_model_parallel_size": 2}}, 6,
     r"world size 6 is not divisible by .* --context-parallel-size \(2\)"),
    ({"parallel": {"context_parallel_size": 2}, "model": {"router_type": "expert_choice",
                                                          "router_load_balancing_type": "none"}}, 2,
     "expert_choice lets each expert pick from the whole micro-batch, which --context-parallel-size 2 splits"),
    ({"parallel": {"context_parallel_size": 2}, "model": {"token_drop_policy": "probs"}}, 2,
     "--moe-token-drop-policy probs ranks .* --context-parallel-size 2 splits; use position"),
    ({"training": {"fp8": "hybrid"}, "model": {"d_model": 200}}, 1, r"d_model = 200 is not a multiple of 16"),
    ({"training": {"recompute_granularity": "selective"}}, 1, "--recompute-granularity='selective': use full"),
    ({"training": {"recompute_granularity": "full", "recompute_num_layers": 2}}, 1,
     "uniform takes 1 .* use --recompute-method block N"),
    ({"training": {"recompute_granularity": "full", "fp8": "hybrid"}}, 1, "with training.fp8 is not supported"),
    ({"checkpoint": {"finetune": True}}, 1, "--finetune starts from the weights of a checkpoint: give --load DIR"),
    ({"parallel": {"heartbeat_timeout_seconds": -1}}, 1, "heartbeat_timeout_seconds=-1.0 must be >= 0"),
    ({"training": {"max_nonfinite_skips": -1}}, 1, "max_nonfinite_skips=-1 must be >= 0"),
    ({"training": {"spiky_loss_factor": 1.0}}, 1, "spiky_loss_factor=1.0 must be > 1"),
    ({"training": {"rerun_mode": "report_stats"}}, 1, "--rerun-mode='report_stats': use disabled or validate_results"),
    # MoE routing (Megatron's --moe-* flags)
    ({"model": {"top_k": 9}}, 1, "--moe-router-topk 9 exceeds --num-experts 8"),
    ({"model": {"shared_expert_intermediate_size": 30}, "parallel": {"tensor_model_parallel_size": 4}}, 4,
     "--moe-shared-expert-intermediate-size 30 is not divisible by --tensor-model-parallel-size 4"),
    ({"model": {"router_type": "expert_choice", "router_enable_expert_bias": True}}, 1,
     "--moe-router-enable-expert-bias balances token-choice routing"),
    ({"model": {"router_type": "expert_choice"}}, 1, "set --moe-router-load-balancing-type none"),
    ({"model": {"router_type": "expert_choice", "router_load_balancing_type": "none", "capacity_factor": None}}, 1,
     "expert choice needs a capacity"),
    ({"model": {"router_type": "expert_choice", "router_load_balancing_type": "none",
                "router_force_load_balancing": True}}, 1, "does not combine with model.router_type=expert_choice"),
    ({"model": {"router_enable_expert_bias": True, "router_force_load_balancing": True}}, 1,
     "the expert bias would do nothing"),
    ({"model": {"router_pre_softmax": False}}, 1, "keep --moe-router-pre-softmax with --moe-router-topk 1"),
    ({"model": {"router_score_function": "relu"}}, 1, "router_score_function='relu': use softmax | sigmoid"),
    ({"model": {"router_load_balancing_type": "sinkhorn"}}, 1,
     "use aux_loss | seq_aux_loss | global_aux_loss | none"),
    ({"model": {"token_drop_policy": "random"}}, 1, "token_drop_policy='random': use position | probs"),
    ({"model": {"router_bias_update_rate": -0.1}}, 1, "router_bias_update_rate=-0.1 must be >= 0"),
    ({"model": {"pattern": "MMMM", "mamba_moe_projections": ["output"], "shared_expert_intermediate_size": 8}}, 1,
     "adds a shared expert to E blocks"),
    ({"model": {"mamba_moe_dense_fallback": True}}, 1, "mamba_moe_dense_fallback is for MoE projections"),
])
def test_validation_names_key_and_fix(overrides, world, message):
    cfg = _valid(**overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=world)


def test_megatron_moe_flags():
    cfg = build_config(None, ["--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
                              "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                              "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.001",
                              "--moe-z-loss-coeff", "0.002", "--moe-shared-expert-intermediate-size", "64",
                              "--moe-ffn-hidden-size", "128", "--num-experts", "16", "--moe-expert-capacity-factor",
                              "none", "--moe-token-drop-policy", "probs", "--moe-router-pre-softmax",
                              "--moe-per-layer-logging"])
    m = cfg.model
    assert (m.top_k, m.router_score_function, m.router_enable_expert_bias, m.router_bias_update_rate) == \
        (2, "sigmoid", True, 0.01)
    assert (m.router_load_balancing_type, m.load_balancing_weight, m.z_loss_weight) == ("seq_aux_loss", 0.001, 0.002)
    assert (m.shared_expert_intermediate_size, m.d_expert, m.num_experts) == (64, 128, 16)
    assert (m.capacity_factor, m.token_drop_policy, m.router_pre_softmax) == (None, "probs", True)
    assert cfg.logging.moe_per_layer_logging
    cfg.validate(world_size=1, check_files=False)
    assert build_config(None, ["--moe-router-force-load-balancing"]).model.router_force_load_balancing


def test_good_layouts_pass():
    _valid().validate(world_size=1)
    _valid(parallel={"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2},
           training={"global_batch_size": 8, "micro_batch_size": 2}).validate(world_size=4)
    _valid(model={"num_experts": 42}, parallel={"expert_model_parallel_size": 2}).validate(world_size=2)


def test_missing_data_and_tokenizer(tmp_path):
    cfg = build_config(None, ["--data-path", str(tmp_path / "corpus_text_document")])
    with pytest.raises(ConfigError, match=r"corpus_text_document.bin does not exist"):
        cfg.validate(world_size=1)
    for ext in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{ext}").write_bytes(b"")
    with pytest.raises(ConfigError, match="--tokenizer-model is not set"):
        cfg.validate(world_size=1)
    cfg.data.tokenizer_model = str(tmp_path / "tok.model")
    with pytest.raises(ConfigError, match="tok.model does not exist"):
        cfg.validate(world_size=1)
    cfg.data.mock = True
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="no training data"):
        Config().validate(world_size=1)


def test_pipeline_stages_are_checked_before_start_up():
    parallel_moe = _valid(model={"pattern": "MEME", "parallel_moe": True},  # 4 letters but 2 blocks
                          parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
                          training={"global_batch_size": 8, "micro_batch_size": 4})
    with pytest.raises(ConfigError, match="2 blocks, fewer than the 4 pipeline stages"):
        parallel_moe.validate(world_size=2)
    marks = _valid(model={"pattern": "ME|ME|ME"}, parallel={"pipeline_model_parallel_size": 2})
    with pytest.raises(ConfigError, match="3 '\\|'-separated stages but the pipeline has 2"):
        marks.validate(world_size=2)


def test_recompute_block_method_takes_the_first_blocks_of_each_stage():
    from megamoe.parallel.parallelize import recomputed_blocks
    cfg = _valid(model={"pattern": "MEME|MEME"}, parallel={"pipeline_model_parallel_size": 2},
                 training={"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1})
    assert recomputed_blocks(cfg) == {0, 4}
    cfg.training.recompute_method, cfg.training.recompute_num_layers = "uniform", 1
    assert recomputed_blocks(cfg) == set(range(8))
    cfg.training.recompute_method = "block"
    cfg.parallel.pipeline_model_parallel_size = 1  # one stage: the '|' marks do not matter
    assert recomputed_blocks(cfg) == {0}
    cfg.training.recompute_granularity = None
    assert recomputed_blocks(cfg) == set()


def test_help_config_lists_every_key_with_its_default_alias_and_meaning():
    from megamoe.config import all_keys, describe_keys
    text = describe_keys()
    assert all(f"--{key} = " in text for key in all_keys(Config()))
    assert ("  --model.capacity_factor = 1.0  (alias --moe-expert-capacity-factor)  # None or <= 0: no capacity "
            "limit (dropless)") in text.splitlines()
    assert "--parallel.tensor_model_parallel_size = 1  (alias --tensor-model-parallel-size)" in text
    assert "training: Steps, batch sizes, precision" in text


def test_data_path_weights_after_their_prefixes_fail_validation(tmp_path):
    """`--data-path a 0.5 b 0.5` is caught with the fix before any process starts (it used to pass validation
    and fail in the datasets, after the process groups were up); weight prefix pairs pass."""
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}{ext}").write_bytes(b"")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = build_config(None, ["--data-path", a, "0.5", b, "0.5", "--tokenizer-model", str(tok)])
    with pytest.raises(ConfigError, match=r"give prefixes alone or weight prefix pairs, e.g. --data-path 0.7"):
        cfg.validate(world_size=1)
    build_config(None, ["--data-path", "0.5", a, "0.5", b, "--tokenizer-model", str(tok)]).validate(world_size=1)

"""Run configuration: one dataclass per concern, loaded from YAML, overridden from the command line.

    schema  model.py (ModelConfig), parallel.py, training.py (OptimizerConfig, TrainingConfig), run.py (DataConfig,
            CheckpointConfig, LoggingConfig, Config); each field an `option(default, help)`; pattern.py, the
            layer-pattern grammar
    flags   flags.py: YAML + `--section.key value` + Megatron's flag names, --help-config

`Config.validate(world_size)` checks the whole config before any process-group work and raises ConfigError
with the key and the fix.
"""
from megamoe.config.flags import (
    MEGATRON_FLAGS,
    add_config_arguments,
    all_keys,
    apply_dict,
    build_config,
    config_from_dict,
    describe_keys,
    load_yaml,
    parse_overrides,
    set_key,
)
from megamoe.config.model import ModelConfig, mamba_d_inner, mamba_dt_rank
from megamoe.config.parallel import ParallelConfig
from megamoe.config.pattern import LAYER_KINDS, block_kinds
from megamoe.config.run import (
    TOKENIZER_TYPES,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    parse_data_path,
    tokenizer_backend,
)
from megamoe.config.training import OptimizerConfig, TrainingConfig
from megamoe.errors import ConfigError

__all__ = ["LAYER_KINDS", "MEGATRON_FLAGS", "TOKENIZER_TYPES", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "TrainingConfig",
           "add_config_arguments", "all_keys", "apply_dict", "block_kinds", "build_config", "config_from_dict",
           "describe_keys", "load_yaml", "mamba_d_inner", "mamba_dt_rank", "parse_data_path", "parse_overrides",
           "set_key", "tokenizer_backend"]

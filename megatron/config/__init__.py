"""Typed configuration: one dataclass per concern, Megatron-LM flag names, YAML presets, validation.

    from megatron.config import Config, parse_config
    cfg = parse_config(["--config", "tiny-cpu", "--data-path", "PREFIX", "--tokenizer-file", "T.json"])
    cfg.model.hidden_size, cfg.training.global_batch_size, cfg.notes()

Parsing validates everything that needs no process group or data: shapes, parallel sizes against the
WORLD_SIZE environment variable (set by torchrun; default 1), batch sizes, schedule, and that the data
prefixes' .idx files and the tokenizer files exist. `check_vocab_size` runs later, once the tokenizer is
built.
"""

from megatron.config._fields import ConfigError
from megatron.config.cli import build_parser, exit_with_error, load_config, parse_config
from megatron.config.config import SECTIONS, Config, check_vocab_size, world_size_from_env
from megatron.config.data import DataConfig
from megatron.config.model import ModelConfig
from megatron.config.optimizer import OptimizerConfig
from megatron.config.parallel import ParallelConfig
from megatron.config.training import CheckpointConfig, LoggingConfig, TrainingConfig

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainingConfig",
    "build_parser",
    "check_vocab_size",
    "exit_with_error",
    "load_config",
    "parse_config",
    "world_size_from_env",
]

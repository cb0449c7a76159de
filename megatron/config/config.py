"""`Config`: the sections together, the cross-checks between them, notes, and serialisation."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from megatron.config._fields import ConfigError, require_finite, show
from megatron.config.compat import NO_EFFECT_FLAGS
from megatron.config.data import DataConfig
from megatron.config.model import ModelConfig
from megatron.config.optimizer import OptimizerConfig
from megatron.config.parallel import ParallelConfig, all_pipeline_layer_ranges
from megatron.config.training import CheckpointConfig, LoggingConfig, TrainingConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def world_size_from_env(environ: dict[str, str] | None = None) -> int:
    """WORLD_SIZE as set by torchrun (default 1), checked before any process group exists."""
    value = (os.environ if environ is None else environ).get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} in the environment is not a positive integer")
    return size


@dataclass
class Config:
    """The whole run: one dataclass per concern plus what validation derived.

    `world_size` is not a flag: `validate()` takes it from WORLD_SIZE (or its argument) to derive the
    data-parallel size. `no_effect_flags` holds compatibility flags that were accepted without effect.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world_size: int = 1
    no_effect_flags: dict[str, Any] = field(default_factory=dict)
    # how validate() chose world_size: "given" (its argument), "WORLD_SIZE", "--data-parallel-size" or
    # "assumed" (a --dry-run at data-parallel size 1)
    world_size_origin: str = "given"

    @property
    def data_parallel_size(self) -> int:
        """world_size / (TP * PP), as validated."""
        return self.parallel.derived_data_parallel_size(self.world_size)

    # The batch arithmetic of a run, in one place (the training loop, the data builders and the planner
    # read it here). Valid once `validate()` has filled in and checked --global-batch-size.
    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank:
        --global-batch-size / (--micro-batch-size x data-parallel size)."""
        train = self.training
        return train.global_batch_size // (train.micro_batch_size * self.data_parallel_size)

    @property
    def num_train_iters(self) -> int:
        """Optimizer steps of the run: --train-iters, or --train-samples // --global-batch-size (whole
        steps only, as Megatron-LM)."""
        train = self.training
        if train.train_iters is not None:
            return train.train_iters
        return train.train_samples // train.global_batch_size

    @property
    def dataset_num_samples(self) -> tuple[int, int, int]:
        """Samples the train, valid and test splits must provide (Megatron-LM's formula; the validation
        count adds 2 evaluations: iteration 0 and the end)."""
        train = self.training
        iters, global_batch = self.num_train_iters, train.global_batch_size
        valid = (iters // train.eval_interval + 2) * train.eval_iters * global_batch
        return iters * global_batch, valid, train.eval_iters * global_batch

    def validate(self, *, world_size: int | None = None, check_paths: bool = True) -> Config:
        """Check every section and the cross-section rules; fill in derived defaults. Returns self.

        world_size: default WORLD_SIZE from the environment (1 if unset; a --dry-run without it plans the
        layout at --data-parallel-size, or at data-parallel size 1: `world_size_origin` says which).
        check_paths: require the data and tokenizer inputs and check that they exist (turn off to inspect a
        config without its data).
        """
        self.world_size, self.world_size_origin = self._world_size(world_size)
        for name in SECTIONS:
            getattr(self, name).validate()
            require_finite(getattr(self, name))  # what the section's own range checks did not name
        self._check_model_parallel()
        self._check_world_size()
        if self.model.torch_compile or self.model.fp8_format:  # only then is torch imported (the device)
            self.model.check_torch_compile(_detect_device_type())
            self.model.check_fp8(
                self.training.precision, self.parallel.tensor_model_parallel_size, _detect_device_type()
            )
        if self.training.eval_code_interval and self.parallel.model_parallel_size > 1:
            raise ConfigError(
                f"--eval-code-interval {self.training.eval_code_interval} needs --tensor-model-parallel-size 1 "
                "and --pipeline-model-parallel-size 1 (each data-parallel rank generates with the whole model)"
            )
        if self.training.rollback_after_spikes is not None and not self.checkpoint.save:
            raise ConfigError(
                f"--rollback-after-spikes {self.training.rollback_after_spikes} needs --save (it rolls "
                "back to a checkpoint saved there)"
            )
        self._resolve_batch()
        self._resolve_schedule()
        if check_paths:  # last, so that mistakes in the flags themselves are reported first
            self.data.check_paths()
        if self.logging.metrics_jsonl is None and self.checkpoint.save:
            self.logging.metrics_jsonl = os.path.join(self.checkpoint.save, "metrics.jsonl")
        return self

    def _world_size(self, given: int | None) -> tuple[int, str]:
        """(world size, where it came from): the argument, WORLD_SIZE, or for a dry run without WORLD_SIZE
        (planning from a laptop) the layout's world size at --data-parallel-size, else at data-parallel
        size 1 (which every global batch size divides)."""
        if given is not None:
            return given, "given"
        if not self.training.dry_run or "WORLD_SIZE" in os.environ:
            return world_size_from_env(), "WORLD_SIZE"
        if self.parallel.data_parallel_size:
            return (
                self.parallel.model_parallel_size * self.parallel.data_parallel_size,
                "--data-parallel-size",
            )
        return self.parallel.model_parallel_size, "assumed"

    def _check_world_size(self) -> None:
        """The data-parallel size derives from the world size; under --dry-run say how to plan without
        launching (the error's 'launch N processes' advice is for a real launch)."""
        try:
            self.parallel.derived_data_parallel_size(self.world_size)
        except ConfigError as error:
            if not self.training.dry_run:
                raise
            raise ConfigError(
                f"{error}; a --dry-run launches nothing: unset WORLD_SIZE to plan at data-parallel size 1, "
                "or give --data-parallel-size N to plan N replicas"
            ) from None

    def _check_model_parallel(self) -> None:
        model, par = self.model, self.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        # hidden_size is a multiple of the head count (model validation), so heads % TP == 0 also makes
        # --hidden-size divisible by TP
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"{show('num_attention_heads', model.num_attention_heads)} is not divisible by "
                f"{show('tensor_model_parallel_size', tp)}; use a tensor-parallel size dividing "
                f"{model.num_attention_heads}: {_divisors(model.num_attention_heads)}"
            )
        if par.sequence_parallel and tp > 1 and model.seq_length % tp:
            raise ConfigError(
                f"{show('seq_length', model.seq_length)} is not divisible by "
                f"{show('tensor_model_parallel_size', tp)}, which --sequence-parallel needs (each "
                f"tensor-parallel rank holds seq-length / TP positions)"
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"{show('ffn_hidden_size', model.ffn_hidden_size)} is not divisible by "
                f"{show('tensor_model_parallel_size', tp)}"
            )
        # every rank's layer ranges, with the model's own function: a split that does not work fails here
        all_pipeline_layer_ranges(model.num_layers, pp, **par.pipeline_layout)

    def _resolve_batch(self) -> None:
        train, par = self.training, self.parallel
        dp = self.data_parallel_size
        per_step = train.micro_batch_size * dp
        if train.global_batch_size is None:
            train.global_batch_size = per_step
        if train.global_batch_size % per_step:
            lower = train.global_batch_size // per_step * per_step
            options = " or ".join(str(n) for n in (lower, lower + per_step) if n > 0)
            raise ConfigError(
                f"{show('global_batch_size', train.global_batch_size)} is not divisible by "
                f"{show('micro_batch_size', train.micro_batch_size)} x data-parallel size {dp} = {per_step}; "
                f"use a multiple of {per_step} such as {options} (data-parallel size = WORLD_SIZE "
                f"{self.world_size} / (tensor {par.tensor_model_parallel_size} x pipeline "
                f"{par.pipeline_model_parallel_size}))"
            )

    def _resolve_schedule(self) -> None:
        opt, train = self.optimizer, self.training
        if train.train_iters is not None:
            if opt.lr_decay_iters is None:
                opt.lr_decay_iters = train.train_iters
            if opt.lr_warmup_samples:
                raise ConfigError(
                    "--lr-warmup-samples goes with --train-samples; with --train-iters use --lr-warmup-iters"
                )
            warmup, source = opt.lr_warmup_iters, show("lr_warmup_iters", opt.lr_warmup_iters)
            if opt.lr_warmup_fraction is not None:
                warmup = int(opt.lr_warmup_fraction * opt.lr_decay_iters)
                source = show("lr_warmup_fraction", opt.lr_warmup_fraction)
            if warmup > opt.lr_decay_iters:
                raise ConfigError(
                    f"warmup of {warmup} iterations ({source}) exceeds "
                    f"{show('lr_decay_iters', opt.lr_decay_iters)} (default: --train-iters); use a warmup "
                    f"<= {opt.lr_decay_iters}"
                )
        else:
            if opt.lr_decay_samples is None:
                opt.lr_decay_samples = train.train_samples
            if opt.lr_warmup_iters:
                raise ConfigError(
                    "--lr-warmup-iters goes with --train-iters; with --train-samples use --lr-warmup-samples"
                )

    def notes(self, device_type: str | None = None) -> list[str]:
        """One-line remarks on flags that are accepted but have no (or reduced) effect, to log once.

        device_type: "cuda" or "cpu"; default: "cuda" when torch sees a GPU.
        """
        if device_type is None:
            device_type = _detect_device_type()
        notes = [
            f"--{name}{'' if value is True else f' {value}'} is accepted for compatibility and has no effect: "
            f"{NO_EFFECT_FLAGS[name][1]}"
            for name, value in self.no_effect_flags.items()
        ]
        notes += _device_notes(self, device_type)
        notes += _optional_package_notes(self)
        if self.parallel.sequence_parallel and self.parallel.tensor_model_parallel_size == 1:
            notes.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
        return notes

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict {section: {field: value}} (JSON/YAML-safe), for checkpoints."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, sections: dict[str, dict[str, Any]]) -> Config:
        """Inverse of to_dict, e.g. for a config stored in a checkpoint (not validated; call validate())."""
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; valid: {list(SECTIONS)}")
        built = {}
        for name, section_cls in SECTIONS.items():
            values = sections.get(name, {})
            valid = {f.name for f in dataclasses.fields(section_cls)}
            extra = sorted(set(values) - valid)
            if extra:
                raise ConfigError(f"unknown {name} settings {extra}; valid: {sorted(valid)}")
            built[name] = section_cls(**values)
        return cls(**built)

    def to_yaml(self) -> str:
        """Flat YAML with flag names as keys, one commented block per section; `--config` reads it back."""
        import yaml

        blocks = []
        for name, section in self.to_dict().items():
            values = {key.replace("_", "-"): value for key, value in section.items()}
            blocks.append(f"# {name}\n" + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))
        return "\n".join(blocks)


def check_vocab_size(config: Config, tokenizer_vocab_size: int) -> int:
    """The model's vocabulary size for this tokenizer: --vocab-size when given (it must hold the
    tokenizer), else the tokenizer's size padded to a multiple of --make-vocab-size-divisible-by x TP.
    Raises ConfigError when the tokenizer is larger than the model's vocabulary."""
    model, tp = config.model, config.parallel.tensor_model_parallel_size
    if model.vocab_size is None:
        multiple = model.make_vocab_size_divisible_by * tp
        return -(-tokenizer_vocab_size // multiple) * multiple
    if tokenizer_vocab_size > model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab_size} tokens, more than {show('vocab_size', model.vocab_size)}; "
            f"use --vocab-size >= {tokenizer_vocab_size} (or omit it to pad the tokenizer's size) or a smaller tokenizer"
        )
    if model.vocab_size % tp:
        raise ConfigError(
            f"{show('vocab_size', model.vocab_size)} is not divisible by "
            f"{show('tensor_model_parallel_size', tp)}"
        )
    return model.vocab_size


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _detect_device_type() -> str:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_notes(config: Config, device_type: str) -> list[str]:
    notes = []
    if config.model.use_flash_attn and device_type != "cuda":
        notes.append("--use-flash-attn has no effect on CPU: attention uses F.scaled_dot_product_attention")
    elif config.model.use_flash_attn and importlib.util.find_spec("flash_attn") is None:
        notes.append("--use-flash-attn: flash-attn is not installed; using F.scaled_dot_product_attention")
    if config.training.precision != "fp32" and device_type != "cuda":
        notes.append(
            f"--{config.training.precision} on CPU works but is much slower than fp32 (use --fp32 for CPU runs)"
        )
    return notes


def _optional_package_notes(config: Config) -> list[str]:
    notes = []
    log = config.logging
    if log.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        notes.append(f"--tensorboard-dir {log.tensorboard_dir} has no effect: tensorboard is not installed")
    if log.wandb_project_name and importlib.util.find_spec("wandb") is None:
        notes.append(f"--wandb-project-name {log.wandb_project_name} has no effect: wandb is not installed")
    return notes

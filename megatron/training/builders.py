"""Builds what a run needs from a validated `Config`: seed, tokenizer, datasets, model, optimizer.

Order matters for reproducibility: the seed is set first, the model initialises from (seed, parameter
name) generators, and the data is a pure function of (seed, sample index), so the same command gives the
same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron.log import get_logger
from megatron.parallel.state import ParallelState
from megatron.training.grad_scaler import build_grad_scaler
from megatron.training.optimizer import PRECISION_DTYPES, MixedPrecisionOptimizer, build_optimizer
from megatron.training.schedule import LRScheduler, build_scheduler

logger = get_logger(__name__)


def set_seed(seed: int, parallel_state: ParallelState) -> None:
    """Seed python, numpy, torch and the per-rank tensor-parallel stream (`ParallelState.seed`); on CPU
    also ask torch for deterministic kernels (free there)."""
    parallel_state.seed(seed)
    if parallel_state.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class DataSplits:
    """Datasets ready for the loader: train, named validation groups, optional test."""

    train: object
    valid: list[tuple[str, object]] = field(default_factory=list)
    test: object | None = None


def build_data(cfg, tokenizer, parallel_state: ParallelState) -> DataSplits:
    """Datasets from --data-path or the weighted split files, wrapped in FIM when --fim-rate > 0."""
    from megatron.data.blend import build_datasets
    from megatron.data.token_ids import TokenBound

    data = cfg.data
    splits = build_datasets(
        data_path=data.data_path,
        split=data.split,
        train_weighted_split_paths_path=data.train_weighted_split_paths_path,
        valid_weighted_split_paths_path=data.valid_weighted_split_paths_path,
        test_weighted_split_paths_path=data.test_weighted_split_paths_path,
        num_samples=cfg.dataset_num_samples,
        seq_length=cfg.model.seq_length,
        seed=cfg.training.seed,
        cache_dir=data.data_cache_path,
        token_bound=TokenBound.of(tokenizer),
    )
    if splits.train is None:
        raise ValueError("the training split is empty: check --split or --train-weighted-split-paths-path")
    wrap = _fim_wrapper(cfg, tokenizer)
    return DataSplits(
        train=wrap(splits.train, "train"),
        valid=[(name, wrap(dataset, f"valid-{name}")) for name, dataset in splits.valid],
        test=wrap(splits.test, "test") if splits.test is not None else None,
    )


def _fim_wrapper(cfg, tokenizer):
    data = cfg.data
    if data.fim_rate <= 0:
        return lambda dataset, name: dataset
    from megatron.data.fim import FIMDataset

    def wrap(dataset, name):
        return FIMDataset(
            dataset,
            tokenizer,
            fim_rate=data.fim_rate,
            fim_spm_rate=data.fim_spm_rate,
            seed=cfg.training.seed,
            name=name,
            fim_split_sample=data.fim_split_sample,
            fragment_fim_rate=data.fragment_fim_rate,
        )

    return wrap


def build_loader(
    cfg, dataset, tokenizer, parallel_state: ParallelState, *, consumed_samples: int, cyclic: bool
):
    """The data loader of one split, resumed at `consumed_samples`."""
    from megatron.data.loader import build_pretraining_data_loader

    data = cfg.data
    return build_pretraining_data_loader(
        dataset,
        consumed_samples=consumed_samples,
        micro_batch_size=cfg.training.micro_batch_size,
        data_parallel_rank=parallel_state.data_parallel_rank,
        data_parallel_size=parallel_state.data_parallel_size,
        num_workers=data.num_workers,
        eod=tokenizer.eod,
        fim_pad=tokenizer.fim_pad,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        cyclic=cyclic,
    )


def build_model(cfg, vocab_size: int, parallel_state: ParallelState) -> torch.nn.Module:
    """This rank's model (GPTModel, or its pipeline stage) initialised from the seed, on the run's device,
    in the compute dtype. The init draws the shard on that device (the same values as on a CPU, bit for
    bit: `megatron.model.init`)."""
    from megatron.model import build_model as build_gpt

    model = build_gpt(cfg.model, vocab_size, parallel_state, cfg.parallel).to(device=parallel_state.device)
    model.init_weights(cfg.training.seed)
    return model.to(dtype=PRECISION_DTYPES[cfg.training.precision])


def build_optimization(
    cfg, model, parallel_state: ParallelState
) -> tuple[MixedPrecisionOptimizer, LRScheduler, object]:
    """Optimizer (with the fp16 grad scaler, or None) and lr scheduler."""
    scaler = build_grad_scaler(cfg.optimizer, fp16=cfg.training.precision == "fp16")
    optimizer = build_optimizer(
        model, cfg.optimizer, grad_scaler=scaler, parallel_state=parallel_state, parallel_config=cfg.parallel
    )
    scheduler = build_scheduler(
        optimizer,
        cfg.optimizer,
        train_iters=cfg.training.train_iters,
        train_samples=cfg.training.train_samples,
        global_batch_size=cfg.training.global_batch_size,
    )
    return optimizer, scheduler, scaler


# The metrics logger reports missing TensorBoard/W&B packages itself (with the install hint).
_NOTES_REPORTED_ELSEWHERE = ("--tensorboard-dir", "--wandb-project-name")


def log_config_notes(cfg) -> None:
    """Once at start: flags that were accepted but have no effect here."""
    notes = getattr(cfg, "notes", None)
    lines = notes() if callable(notes) else (notes or [])
    for line in lines:
        if not line.startswith(_NOTES_REPORTED_ELSEWHERE):
            logger.info(f"NOTE: {line}")

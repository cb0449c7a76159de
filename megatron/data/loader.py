"""The pretraining data loader: a data-parallel-sharded, resumable sampler feeding worker processes.

Samples are consumed in index order, one global step of `micro_batch_size * data_parallel_size`
consecutive indices at a time; data-parallel rank r takes the r-th `micro_batch_size` slice (Megatron's
MegatronPretrainingSampler). Resuming from `consumed_samples` continues exactly where a run stopped.
Each batch is a dict of tensors built as Megatron's `get_batch` and `get_ltor_masks_and_position_ids`
do, vectorised: `tokens`, `labels`, `loss_mask`, `position_ids` and, with `reset_attention_mask`,
`attention_mask` (bool [b, 1, s, s], True = masked out).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader


class PretrainingBatchSampler:
    """Index batches for one data-parallel rank, starting after `consumed_samples` samples.

    Non-cyclic: stops when fewer than a full global step of samples remain (the partial step is dropped,
    as in Megatron). Cyclic: sample k of the endless stream is dataset index k % total_samples.
    """

    def __init__(
        self,
        total_samples: int,
        *,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        cyclic: bool = False,
    ):
        if total_samples < 1:
            raise ValueError(f"the dataset is empty (total_samples={total_samples})")
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be at least 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} must be in [0, data_parallel_size="
                f"{data_parallel_size})"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_step_size = micro_batch_size * data_parallel_size
        self.rank_offset = data_parallel_rank * micro_batch_size
        self.cyclic = cyclic

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic sampler is endless")
        return max(0, (self.total_samples - self.consumed_samples) // self.global_step_size)

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.consumed_samples
        while self.cyclic or step_start + self.global_step_size <= self.total_samples:
            first = step_start + self.rank_offset
            yield [index % self.total_samples for index in range(first, first + self.micro_batch_size)]
            step_start += self.global_step_size


def _seed_worker(worker_id: int, *, data_parallel_rank: int) -> None:
    """Deterministic per-worker seeds for any library randomness (FIM does not depend on them)."""
    seed = (data_parallel_rank * 1_000_003 + worker_id) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _init_worker(worker_id: int, *, data_parallel_rank: int) -> None:
    _seed_worker(worker_id, data_parallel_rank=data_parallel_rank)
    _leave_sigterm_to_the_trainer()


def _leave_sigterm_to_the_trainer() -> None:
    """In a worker: a SIGTERM from anyone but the training process is ignored; the trainer's own
    (terminating a worker at shutdown) still ends it.

    torchrun's agent signals a worker's whole process group, and SLURM every process of the step: a
    worker dying of that SIGTERM makes the training process fail with "DataLoader worker ... killed by
    signal" wherever it is, in the middle of the checkpoint a preemption asks for. The training process
    decides (save and stop, or exit); its workers end with it. SIGTERM is blocked in every thread and a
    daemon thread takes each one with its sender (sigwaitinfo); SIGKILL ends a worker as always."""
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: keep the default
        return
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the thread below inherits the mask

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == trainer or os.getppid() != trainer:  # the trainer's, or the trainer is gone
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=take_sigterm, name="sigterm-from-trainer", daemon=True).start()


def collate_batch(
    samples: list[np.ndarray],
    *,
    eod: int,
    fim_pad: int | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> dict[str, torch.Tensor]:
    """Batch dict of `seq_length + 1`-token samples: inputs, shifted labels, masks and positions."""
    data = torch.from_numpy(np.stack([np.asarray(sample, dtype=np.int64) for sample in samples]))
    tokens = data[:, :-1].contiguous()
    labels = data[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    if fim_pad is not None:
        loss_mask[labels == fim_pad] = 0.0
    if eod_mask_loss:
        # Megatron's rule: no loss where the *input* is EOD (the first token of the next document is
        # not predicted from across the boundary).
        loss_mask[tokens == eod] = 0.0
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    batch["position_ids"], attention_mask = position_ids_and_mask(
        tokens, eod=eod, reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask
    )
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask
    return batch


def position_ids_and_mask(
    tokens: torch.Tensor, *, eod: int, reset_position_ids: bool, reset_attention_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (restarting after each EOD with reset) and the optional document-causal mask.

    A document starts right after an EOD; the EOD belongs to the document it ends (as in Megatron).
    """
    batch_size, seq_length = tokens.shape
    positions = torch.arange(seq_length, dtype=torch.int64).expand(batch_size, seq_length)
    starts_document = torch.zeros_like(tokens, dtype=torch.bool)
    starts_document[:, 1:] = tokens[:, :-1] == eod
    position_ids = positions.clone()
    if reset_position_ids:
        document_start = torch.where(starts_document, positions, torch.zeros_like(positions))
        position_ids = positions - torch.cummax(document_start, dim=1).values
    if not reset_attention_mask:
        return position_ids, None
    document = torch.cumsum(starts_document, dim=1)  # [b, s]
    same_document = document[:, :, None] == document[:, None, :]  # [b, s, s]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    attention_mask = ~(same_document & causal)  # True = masked out
    return position_ids, attention_mask[:, None]  # [b, 1, s, s]


def build_pretraining_data_loader(
    dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 2,
    eod: int,
    fim_pad: int | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    cyclic: bool = False,
) -> DataLoader | None:
    """A DataLoader of batch dicts for this data-parallel rank (None when `dataset` is None).

    Workers (`num_workers` > 0) are persistent processes; samples are pure functions of their index, so
    the batches do not depend on the number of workers.
    """
    if dataset is None:
        return None
    if num_workers < 0:
        raise ValueError(f"--num-workers must be non-negative, got {num_workers}")
    sampler = PretrainingBatchSampler(
        len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        cyclic=cyclic,
    )
    collate = functools.partial(
        collate_batch,
        eod=eod,
        fim_pad=fim_pad,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_init_worker, data_parallel_rank=data_parallel_rank)
        if num_workers > 0
        else None,
    )

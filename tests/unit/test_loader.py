"""The pretraining loader: DP sharding, resume, workers, and Megatron's masks and position ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.fim import FIMDataset
from megatron.data.loader import (
    PretrainingBatchSampler,
    build_pretraining_data_loader,
    collate_batch,
)

EOD = 0
FIM_PAD = 4


class IndexDataset:
    """Sample i is [i, i+1, ..., i+seq_length] so each batch row names its sample index."""

    def __init__(self, num_samples: int, seq_length: int = 6):
        self.num_samples = num_samples
        self.seq_length = seq_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        return np.arange(index, index + self.seq_length + 1, dtype=np.int64) + 1000


def sample_indices(loader) -> list[list[int]]:
    return [(batch["tokens"][:, 0] - 1000).tolist() for batch in loader]


def test_each_global_step_covers_its_samples_once_across_ranks():
    dataset = IndexDataset(50)
    micro_batch_size, data_parallel_size = 2, 3
    per_rank = [
        sample_indices(
            build_pretraining_data_loader(
                dataset,
                consumed_samples=0,
                micro_batch_size=micro_batch_size,
                data_parallel_rank=rank,
                data_parallel_size=data_parallel_size,
                num_workers=0,
                eod=EOD,
            )
        )
        for rank in range(data_parallel_size)
    ]
    global_step = micro_batch_size * data_parallel_size
    num_steps = 50 // global_step
    assert all(len(batches) == num_steps for batches in per_rank)
    for step in range(num_steps):
        seen = [index for rank in range(data_parallel_size) for index in per_rank[rank][step]]
        assert seen == list(range(step * global_step, (step + 1) * global_step))
    assert per_rank[1][0] == [2, 3]


def test_resume_from_consumed_samples_continues_the_run():
    dataset = IndexDataset(40)
    options = {"micro_batch_size": 2, "data_parallel_rank": 1, "data_parallel_size": 2, "num_workers": 0}
    full = sample_indices(build_pretraining_data_loader(dataset, consumed_samples=0, eod=EOD, **options))
    resumed = sample_indices(build_pretraining_data_loader(dataset, consumed_samples=12, eod=EOD, **options))
    assert resumed == full[3:]
    assert (
        len(
            PretrainingBatchSampler(
                40, consumed_samples=12, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2
            )
        )
        == 7
    )


def test_cyclic_restarts_from_the_beginning():
    loader = build_pretraining_data_loader(
        IndexDataset(5), consumed_samples=3, micro_batch_size=2, num_workers=0, eod=EOD, cyclic=True
    )
    iterator = iter(loader)
    assert [next(iterator)["tokens"][:, 0].tolist() for _ in range(4)] == [
        [1003, 1004],
        [1000, 1001],
        [1002, 1003],
        [1004, 1000],
    ]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="data_parallel_rank"):
        build_pretraining_data_loader(
            IndexDataset(4),
            consumed_samples=0,
            micro_batch_size=1,
            data_parallel_rank=2,
            data_parallel_size=2,
            eod=EOD,
        )
    with pytest.raises(ValueError, match="micro-batch-size"):
        build_pretraining_data_loader(IndexDataset(4), consumed_samples=0, micro_batch_size=0, eod=EOD)
    with pytest.raises(ValueError, match="consumed_samples"):
        build_pretraining_data_loader(IndexDataset(4), consumed_samples=-1, micro_batch_size=1, eod=EOD)
    assert build_pretraining_data_loader(None, consumed_samples=0, micro_batch_size=1, eod=EOD) is None


def test_workers_do_not_change_fim_batches(tiny_tokenizer):
    tok = tiny_tokenizer
    stream = np.array(
        (tok.encode("def f(x):\n    return x . y  # 's\n") + [tok.eod]) * 12
        + tok.encode("if a != b:\n    pass\n")
    )
    samples = [stream[i * 13 : i * 13 + 33] for i in range(12)]
    dataset = FIMDataset(samples, tok, fim_rate=0.5, seed=77)

    def batches(num_workers):
        loader = build_pretraining_data_loader(
            dataset,
            consumed_samples=2,
            micro_batch_size=2,
            num_workers=num_workers,
            eod=tok.eod,
            fim_pad=tok.fim_pad,
        )
        return [{key: value.clone() for key, value in batch.items()} for batch in loader]

    in_process, with_workers = batches(0), batches(2)
    assert len(in_process) == 5
    for expected, got in zip(in_process, with_workers, strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert any((batch["tokens"] == tok.fim_prefix).any() for batch in in_process)


def megatron_reference(data: torch.Tensor, eod: int, reset_position_ids: bool, reset_attention_mask: bool):
    """Megatron's get_ltor_masks_and_position_ids loop (token by token), with the bool convention."""
    batch_size, seq_length = data.shape
    attention_mask = torch.tril(torch.ones(batch_size, 1, seq_length, seq_length))
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for b in range(batch_size):
        previous = 0
        for i in range(seq_length):
            if data[b, i] != eod:
                continue
            if reset_attention_mask:
                attention_mask[b, 0, i + 1 :, : i + 1] = 0
            if reset_position_ids:
                position_ids[b, i + 1 :] -= i + 1 - previous
                previous = i + 1
    return position_ids, attention_mask < 0.5


@pytest.mark.parametrize("reset_position_ids", [False, True])
@pytest.mark.parametrize("reset_attention_mask", [False, True])
def test_masks_and_positions_match_megatron(reset_position_ids, reset_attention_mask):
    draw = np.random.default_rng(0)
    samples = [draw.integers(0, 6, size=17) for _ in range(3)]
    samples[0][:3] = EOD  # leading and repeated EODs
    samples[1][-2:] = EOD
    batch = collate_batch(
        samples, eod=EOD, reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask
    )
    positions, mask = megatron_reference(batch["tokens"], EOD, reset_position_ids, reset_attention_mask)
    assert torch.equal(batch["position_ids"], positions)
    assert batch["position_ids"].dtype == torch.int64
    if reset_attention_mask:
        assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (3, 1, 16, 16)
        assert torch.equal(batch["attention_mask"], mask)
    else:
        assert "attention_mask" not in batch


@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_tokens_labels_and_loss_mask(eod_mask_loss):
    sample = np.array([7, 8, EOD, 9, FIM_PAD, FIM_PAD, EOD, 5])
    batch = collate_batch([sample], eod=EOD, fim_pad=FIM_PAD, eod_mask_loss=eod_mask_loss)
    assert batch["tokens"].tolist() == [[7, 8, EOD, 9, FIM_PAD, FIM_PAD, EOD]]
    assert batch["labels"].tolist() == [[8, EOD, 9, FIM_PAD, FIM_PAD, EOD, 5]]
    # With eod_mask_loss, Megatron masks the positions whose input token is EOD (indices 2 and 6).
    eod_weight = 0.0 if eod_mask_loss else 1.0
    assert batch["loss_mask"].tolist() == [[1.0, 1.0, eod_weight, 0.0, 0.0, 1.0, eod_weight]]
    assert batch["loss_mask"].dtype == torch.float32

"""Shapes, batches and error measures shared by the tensor- and pipeline-parallel model tests."""

from __future__ import annotations

import torch

from tests.helpers import TINY_MODEL

VOCAB = 128
SEQ = TINY_MODEL["seq_length"]  # the models are tests.helpers.tiny_model_config()'s
BATCH = 2
SEED = 1234


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def document_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Two documents of SEQ / 2 tokens each: the block-diagonal causal mask and restarting positions."""
    half = SEQ // 2
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    mask[half:, :half] = True
    positions = torch.cat([torch.arange(half), torch.arange(half)]).expand(BATCH, SEQ)
    return mask.expand(BATCH, 1, SEQ, SEQ), positions


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest entry of `expected`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.abs().max().item(), 1e-12)
    return (actual.double() - expected.double()).abs().max().item() / scale

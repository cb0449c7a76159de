"""Evaluation: the token-mean loss over `eval_iters` global batches of a validation or test set.

Each evaluation starts a fresh pass from the start of the set, so every evaluation of a run scores the
same held-out samples and the losses are comparable across iterations. Evaluation runs in eval mode (no
dropout) and under a forked RNG so it never changes the training random stream. The micro-batches go
through the training schedule forward only (`step.forward_backward`), so under pipeline parallelism
the last stage computes the loss and every rank reports it.
"""

from __future__ import annotations

import math

import torch

from megatron.parallel.state import ParallelState
from megatron.training.step import forward_backward, next_micro_batches


def _rng_devices(parallel_state: ParallelState) -> list:
    device = parallel_state.device
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    *,
    eval_iters: int,
    num_micro_batches: int,
    parallel_state: ParallelState,
) -> tuple[float, int]:
    """Returns (loss, loss tokens): summed token loss / loss tokens over `eval_iters` global batches,
    read from the start of `loader` (a fresh iterator each call)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_tokens = torch.zeros((), dtype=torch.float64)
    with torch.random.fork_rng(devices=_rng_devices(parallel_state)):
        data_iterator = iter(loader)
        for _ in range(eval_iters):
            batches = next_micro_batches(data_iterator, num_micro_batches, parallel_state.device)
            batch_sum, batch_tokens = forward_backward(
                model, None, batches, parallel_state, forward_only=True
            )  # both the same on every rank: summed over the pipeline and data-parallel ranks
            loss_sum += batch_sum.double().cpu()
            num_tokens += batch_tokens.double().cpu()
    model.train(was_training)
    return float(loss_sum / num_tokens.clamp(min=1.0)), int(num_tokens)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite in the logs."""
    return math.exp(min(loss, 20.0))

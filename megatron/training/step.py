"""One training iteration: forward/backward over the micro-batches of a global batch, then the optimizer.

Loss definition (what "lm loss" means everywhere in this framework): the sum of the per-token
cross-entropy over every loss token of the global batch (all micro-batches, all data-parallel ranks),
divided by the number of loss tokens in the global batch (the sum of `loss_mask`). Each micro-batch's
backward uses `sum(token_loss * loss_mask) / total_loss_tokens`, so the accumulated gradient is exactly
the gradient of that global mean, however the global batch is cut into micro-batches: micro 1 x 4
accumulation steps equals micro 4 x 1 up to floating-point summation order. (Megatron instead averages
each micro-batch's token mean, which weights tokens unequally when micro-batches hold different numbers
of loss tokens, e.g. with FIM padding or --eod-mask-loss.) With data parallelism the total token count is
summed over ranks before the backward, and the gradients are then summed (not averaged) over ranks.
Under pipeline parallelism the loss is computed on the last stage and its sum reaches every rank (see
megatron/parallel/pipeline.py, which runs the micro-batches in every layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.parallel import pipeline
from megatron.parallel.pipeline import count_loss_tokens, micro_batch_loss_sum  # noqa: F401 - re-exported
from megatron.parallel.state import ParallelState
from megatron.training.optimizer import MixedPrecisionOptimizer


@dataclass
class StepOutput:
    """The outcome of one iteration. `nonfinite` names what was not finite ("loss" or "grad norm"),
    else None; `overflow` is an fp16 loss-scale overflow (expected now and then: step skipped)."""

    lm_loss: float
    num_loss_tokens: int
    grad_norm: float | None
    update_successful: bool
    overflow: bool = False
    nonfinite: str | None = None


def next_micro_batches(data_iterator, num_micro_batches: int, device: torch.device) -> list[dict]:
    """Pull the micro-batches of one global step and move their tensors to `device`."""
    batches = []
    for _ in range(num_micro_batches):
        batch = next(data_iterator, None)
        if batch is None:
            raise RuntimeError(
                "the data loader ran out of samples: the dataset was sized for --train-iters/--train-samples "
                "(and --eval-iters); rebuild it with the current values"
            )
        batches.append({key: value.to(device, non_blocking=True) for key, value in batch.items()})
    return batches


def forward_backward(
    model,
    optimizer: MixedPrecisionOptimizer,
    micro_batches: list[dict],
    parallel_state: ParallelState,
    *,
    trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradient of the global-batch token mean through the pipeline schedule for this
    layout (`megatron.parallel.pipeline.forward_backward`, which appends the order it ran to `trace`);
    returns (loss sum, loss tokens), the same on every rank."""
    return pipeline.forward_backward(model, optimizer, micro_batches, parallel_state, trace=trace)


def train_step(
    model,
    optimizer: MixedPrecisionOptimizer,
    micro_batches: list[dict],
    parallel_state: ParallelState,
    *,
    trace: list | None = None,
) -> StepOutput:
    """Zero grads, accumulate over `micro_batches`, and step unless the loss or gradients are bad.

    A non-finite loss skips the optimizer (the caller stops or counts, per --skip-nonfinite); a
    non-finite gradient norm likewise. Under fp16 an inf/nan gradient is a loss-scale overflow: the step
    is skipped and the scale adapted, which is normal. `trace`: a list to receive the schedule's
    (kind, micro_batch, chunk) order (`pipeline.format_trace` prints it).
    """
    model.train()
    optimizer.zero_grad()
    loss_sum, total_tokens = forward_backward(model, optimizer, micro_batches, parallel_state, trace=trace)
    lm_loss = (loss_sum / total_tokens).item()
    num_tokens = int(total_tokens.item())
    if not math.isfinite(lm_loss):
        return StepOutput(lm_loss, num_tokens, None, update_successful=False, nonfinite="loss")
    result = optimizer.step()
    nonfinite = None
    if not result.update_successful and not result.found_inf:
        nonfinite = "grad norm"
    return StepOutput(
        lm_loss,
        num_tokens,
        result.grad_norm,
        update_successful=result.update_successful,
        overflow=result.found_inf,
        nonfinite=nonfinite,
    )

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def count_loss_tokens(micro_batches: list[dict], parallel_state: ParallelState) -> torch.Tensor:
    """Loss tokens in the global batch (summed over data-parallel ranks), as an fp32 scalar >= 1."""
    local = torch.stack([batch["loss_mask"].sum(dtype=torch.float32) for batch in micro_batches]).sum()
    return parallel_state.all_reduce_data_parallel(local).clamp(min=1.0)


def micro_batch_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """sum(token_loss * loss_mask) over one micro-batch, in fp32 (differentiable)."""
    token_losses = model(
        batch["tokens"],
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )  # [b, s] fp32
    return (token_losses.float() * batch["loss_mask"]).sum()


def forward_backward(
    model, optimizer: MixedPrecisionOptimizer, micro_batches: list[dict], parallel_state: ParallelState
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradient of the global-batch token mean; returns (loss sum, loss tokens)."""
    total_tokens = count_loss_tokens(micro_batches, parallel_state)
    loss_sum = torch.zeros((), dtype=torch.float32, device=total_tokens.device)
    for index, batch in enumerate(micro_batches):
        micro_sum = micro_batch_loss_sum(model, batch)
        # the last backward may start the gradient reductions (--overlap-grad-reduce)
        optimizer.backward(micro_sum / total_tokens, last_micro_batch=index == len(micro_batches) - 1)
        loss_sum += micro_sum.detach()
    return parallel_state.all_reduce_data_parallel(loss_sum), total_tokens


def train_step(
    model, optimizer: MixedPrecisionOptimizer, micro_batches: list[dict], parallel_state: ParallelState
) -> StepOutput:
    """Zero grads, accumulate over `micro_batches`, and step unless the loss or gradients are bad.

    A non-finite loss skips the optimizer (the caller stops or counts, per --skip-nonfinite); a
    non-finite gradient norm likewise. Under fp16 an inf/nan gradient is a loss-scale overflow: the step
    is skipped and the scale adapted, which is normal.
    """
    model.train()
    optimizer.zero_grad()
    loss_sum, total_tokens = forward_backward(model, optimizer, micro_batches, parallel_state)
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

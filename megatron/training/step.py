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

Schedules: without pipeline parallelism `forward_backward` runs forward and backward of each micro-batch
in turn, the gradients accumulating; with it, the pipeline schedules of `megatron.parallel.pipeline` run
this rank's stage, the loss is computed on the last stage and its sum reaches every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from megatron.parallel import pipeline
from megatron.parallel.collectives import all_reduce, all_reduce_async, host_waiting, wait
from megatron.parallel.state import ParallelState
from megatron.training.nonfinite import LocalGradCheck, name_nonfinite_ranks
from megatron.training.optimizer import MixedPrecisionOptimizer


@dataclass
class StepOutput:
    """The outcome of one iteration. `nonfinite` names what was not finite ("loss", "gradient" or "grad
    norm"), else None; `overflow` is an fp16 loss-scale overflow (expected now and then: step skipped).
    `nonfinite_ranks`: the ranks whose local gradients held an inf/nan (--check-for-nan-in-loss-and-grad),
    with `nonfinite_where` a line per rank naming its first such parameter. `spike`: the loss was a spike
    (--check-for-spiky-loss), the update skipped. `skipped_by_list`: --iterations-to-skip, not run."""

    lm_loss: float
    num_loss_tokens: int
    grad_norm: float | None
    update_successful: bool
    overflow: bool = False
    nonfinite: str | None = None
    stop_requested: bool = False  # some rank asked to stop (SIGTERM): save and exit after this step
    nonfinite_ranks: tuple[int, ...] = ()
    nonfinite_where: tuple[str, ...] = ()
    spike: bool = False
    skipped_by_list: bool = False


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


def masked_loss_sum(token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
    """sum(token_loss * loss_mask) in fp32 (differentiable); token_losses [b, s]."""
    return (token_losses.float() * batch["loss_mask"]).sum()


def micro_batch_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """sum(token_loss * loss_mask) over one micro-batch through the whole model, in fp32."""
    token_losses = model(
        batch["tokens"],
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )  # [b, s] fp32
    return masked_loss_sum(token_losses, batch)


def forward_backward(
    model: torch.nn.Module,
    optimizer: MixedPrecisionOptimizer | None,
    micro_batches: list[dict],
    parallel_state: ParallelState,
    *,
    forward_only: bool = False,
    trace: list | None = None,
    faults=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (and unless `forward_only`, backward) of this rank's model over `micro_batches`,
    accumulating the gradient of the global-batch token-mean loss.

    Returns (loss sum, loss tokens): fp32 scalars, the same on every rank of the job. `optimizer`: a
    `MixedPrecisionOptimizer` (loss scaling, gradient buffer) or None for plain autograd; unused when
    `forward_only` (which runs under no_grad). `trace`: a list that receives the (kind, micro_batch,
    chunk) order the schedule ran (`pipeline.format_trace` prints it). `faults`: the test-only
    `megatron.training.faults.Faults` (a spike scales this rank's loss sum before the reduction).
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    pipelined = parallel_state.pipeline_model_parallel_size > 1
    if pipelined:
        pipeline.check_model(model, parallel_state, micro_batches)
    total_tokens = count_loss_tokens(micro_batches, parallel_state)
    with torch.no_grad() if forward_only else nullcontext():
        if pipelined:
            loss_sum = pipeline.run_schedule(
                model,
                optimizer,
                micro_batches,
                parallel_state,
                loss_fn=masked_loss_sum,
                total_tokens=total_tokens,
                forward_only=forward_only,
                trace=trace,
            )
        else:
            loss_sum = _no_pipelining(model, optimizer, micro_batches, total_tokens, forward_only, trace)
    if faults is not None and faults.active:  # MEGATRON_FAULTS spike (tests): this rank's loss, unreduced
        loss_sum = faults.scale_loss(loss_sum)
    loss_sum = all_reduce(loss_sum, parallel_state.pp_group)  # non-zero on the last stage only
    return parallel_state.all_reduce_data_parallel(loss_sum), total_tokens


def _no_pipelining(model, optimizer, micro_batches, total_tokens, forward_only, trace) -> torch.Tensor:
    """Gradient accumulation over the micro-batches through `model(...)` (the whole model)."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=total_tokens.device)
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        pipeline.record(trace, "F", index, 0)
        micro_sum = micro_batch_loss_sum(model, batch)
        if not forward_only:
            pipeline.record(trace, "B", index, 0)
            # the last backward may start the gradient reductions (--overlap-grad-reduce)
            pipeline.backward_step(optimizer, micro_sum / total_tokens, None, last_micro_batch=index == last)
        loss_sum += micro_sum.detach()
    return loss_sum


def train_step(
    model,
    optimizer: MixedPrecisionOptimizer,
    micro_batches: list[dict],
    parallel_state: ParallelState,
    *,
    trace: list | None = None,
    stop_requested: Callable[[], bool] | None = None,
    check_grads: bool = False,
    is_spike: Callable[[float], bool] | None = None,
    faults=None,
) -> StepOutput:
    """Zero grads, accumulate over `micro_batches`, and step unless the loss or gradients are bad.

    A non-finite loss skips the optimizer (the caller stops or counts, per --skip-nonfinite); a
    non-finite gradient norm likewise. Under fp16 an inf/nan gradient is a loss-scale overflow: the step
    is skipped and the scale adapted, which is normal. `trace`: see `forward_backward`.

    One host sync: everything the host needs to decide and report (the loss, the loss tokens, the
    gradient norm, the fp16 overflow flag, the stop flag and the per-rank non-finite flags) comes back
    in one device-to-host read (`read_on_host`) after the backward; nothing else waits for the device.
    `stop_requested`: polled once after the backward for this rank's stop request (SIGTERM);
    `StepOutput.stop_requested` is whether any rank of the job asked (a sum over the world, started
    asynchronously, riding on the same read). `check_grads` (--check-for-nan-in-loss-and-grad, not
    under fp16): each rank flags a non-finite LOCAL gradient (`nonfinite.LocalGradCheck`, before the
    reductions) in its slot of that same all-reduce; a flagged step is skipped, and only then are the
    parameters named (extra reads). `is_spike(loss)` (--check-for-spiky-loss): True skips the update.
    `faults`: the test-only MEGATRON_FAULTS hooks (see `forward_backward`).
    """
    model.train()
    optimizer.zero_grad()
    check = LocalGradCheck.for_optimizer(optimizer) if check_grads else None
    if check is not None:
        check.start()
    loss_sum, total_tokens = forward_backward(
        model, optimizer, micro_batches, parallel_state, trace=trace, faults=faults
    )
    requested = bool(stop_requested()) if stop_requested is not None else False
    flags = _world_flags(requested, check, parallel_state, total_tokens.device)
    flags_handle = all_reduce_async(flags, parallel_state.world_group)
    pending = optimizer.prepare_step()
    wait(flags_handle)
    lm_loss, tokens, stop_count, *rest = read_on_host(
        loss_sum / total_tokens, total_tokens, flags, pending.stats
    )
    slots, stats = rest[: flags.numel() - 1], rest[flags.numel() - 1 :]
    skipped = StepOutput(lm_loss, int(tokens), None, False, stop_requested=stop_count > 0)
    skipped.nonfinite_ranks = tuple(rank for rank, flag in enumerate(slots) if flag > 0)
    if skipped.nonfinite_ranks:
        skipped.nonfinite_where = tuple(name_nonfinite_ranks(check, skipped.nonfinite_ranks, parallel_state))
    if not math.isfinite(lm_loss) or skipped.nonfinite_ranks:
        skipped.nonfinite = "loss" if not math.isfinite(lm_loss) else "gradient"
        return skipped
    if is_spike is not None and is_spike(lm_loss):
        skipped.spike = True
        return skipped
    result = optimizer.finish_step(pending, stats)
    nonfinite = None
    if not result.update_successful and not result.found_inf:
        nonfinite = "grad norm"
    return StepOutput(
        lm_loss,
        int(tokens),
        result.grad_norm,
        update_successful=result.update_successful,
        overflow=result.found_inf,
        nonfinite=nonfinite,
        stop_requested=stop_count > 0,
    )


def _world_flags(
    requested: bool, check: LocalGradCheck | None, parallel_state: ParallelState, device: torch.device
) -> torch.Tensor:
    """[this rank's stop request] plus, with `check`, one slot per rank of the world, this rank's set to
    its non-finite-gradient flag: summed over the world, every rank learns which ranks had one."""
    stop = torch.full((1,), float(requested), dtype=torch.float32, device=device)
    if check is None:
        return stop
    slots = torch.zeros(parallel_state.world_size, dtype=torch.float32, device=device)
    slots[parallel_state.rank] = check.local_flag(device)  # a device copy, no host read
    return torch.cat([stop, slots])


def read_on_host(*tensors: torch.Tensor) -> list[float]:
    """The values of fp32 device tensors (flattened, in order) as Python floats, in one device-to-host
    copy: the training step's single host sync (on a GPU the host waits here for the queued collectives:
    counted as waiting for peers, not busy, by the straggler report)."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    with host_waiting():
        return flat.tolist()

"""AdamW with fp32 master weights, fp32 gradient accumulation, clipping by global norm and loss scaling,
over data-parallel gradient buckets and optionally the distributed optimizer (ZeRO-1).

Gradients live in one contiguous fp32 buffer (`parallel/data_parallel.GradBuffer`): `param.main_grad` is
each parameter's view into it, reduced over tensor-parallel (`tp_grad_reduce` parameters) and
data-parallel ranks in buckets, during the last micro-batch's backward with --overlap-grad-reduce, else
at the start of `step()`.

Precision modes:
- fp32: the model parameters are the optimizer's parameters; autograd accumulates into `param.grad`, which
  is the `main_grad` view itself (one process computes exactly what it did without the buffer).
- bf16/fp16: the model computes in half precision; each half-precision gradient is added into the fp32
  `main_grad` right after it is produced (a post-accumulate-grad hook), so accumulation over micro-batches
  happens in fp32. AdamW updates fp32 copies ("main params") of the weights, which are copied back
  (rounded) into the model after every successful step.
- fp16 additionally multiplies the loss by the grad scaler's scale before backward, unscales the fp32
  gradients before clipping, and skips the whole step when any gradient is inf/nan.

With --use-distributed-optimizer each gradient bucket is reduce-scattered into the 1/DP chunk this rank
owns, the fp32 masters and Adam moments exist only for that chunk (`ShardedMainParams`, per-parameter
fragments), the norm, unscaling and AdamW run over those fragments, and the updated parameters are
all-gathered over DP straight into the model's parameter buffer after the step; with
--overlap-param-gather the all-gathers run during the next forward (each module waits for its own
parameters), and `finish_param_sync` waits for all of them (checkpoint save, evaluation, replica check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.parallel.data_parallel import GradBuffer, ShardedMainParams, copy_sharding_attributes
from megatron.parallel.pipeline import backward_from_output
from megatron.parallel.state import ParallelState

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """What one optimizer step did. `grad_norm` is None when an fp16 overflow skipped the step before it
    was computed."""

    update_successful: bool
    grad_norm: float | None
    found_inf: bool


@dataclass
class PendingStep:
    """An optimizer step up to its host read (`MixedPrecisionOptimizer.prepare_step`). `stats`: fp32 on
    the device, summed over the ranks holding distinct gradients: [squared gradient norm] plus, under
    fp16, [number of ranks whose unscaled gradients hold an inf/nan]."""

    grads: list[torch.Tensor]
    stats: torch.Tensor


def clip_grad_norm(
    params: list[torch.nn.Parameter],
    grads: list[torch.Tensor],
    max_norm: float,
    parallel_state: ParallelState,
    *,
    sharded_over_data_parallel: bool = False,
) -> float:
    """Clip `grads` in place to global L2 norm `max_norm` (no clipping when `max_norm <= 0`) and return
    the norm before clipping, computed in fp32 (its square root in fp64).

    `params[i]` owns `grads[i]` and is only read for its sharding attributes: a parameter replicated
    across tensor-parallel ranks (`tensor_model_parallel` False) counts on TP rank 0 only, and the last
    pipeline stage's copy of the tied word embedding (`pipeline_duplicate`) not at all (the first stage
    counts it), so that the sum over model-parallel ranks counts each weight once.
    `sharded_over_data_parallel`: each DP rank holds a disjoint piece of the gradients (distributed
    optimizer), so the squares are summed over every rank. Every rank must call this (it communicates),
    with or without gradients. One host read; the optimizer's step folds the same read into the
    iteration's single one (`prepare_step` / `finish_step`).
    """
    local = local_grad_norm_squared(params, grads, parallel_state)
    total_sq = _sum_over_gradient_holders(local, parallel_state, sharded_over_data_parallel)
    total_norm = math.sqrt(total_sq.item())
    clip_grads_(grads, max_norm, total_norm)
    return total_norm


def local_grad_norm_squared(
    params: list[torch.nn.Parameter], grads: list[torch.Tensor], parallel_state: ParallelState
) -> torch.Tensor:
    """This rank's share of the squared global gradient norm: an fp32 scalar on the device, no host read
    (which gradients count: `clip_grad_norm`)."""
    counted = [
        grad for param, grad in zip(params, grads, strict=True) if _counted_in_norm(param, parallel_state)
    ]
    device = grads[0].device if grads else parallel_state.device
    if not counted:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack(torch._foreach_norm(counted))  # fp32 gradients; one multi-tensor kernel on CUDA
    return norms.square().sum()


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that is below 1 (Megatron's rule);
    nothing when `max_norm <= 0` or the norm is not finite (that step is skipped anyway)."""
    if max_norm > 0 and math.isfinite(total_norm):
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)


def _counted_in_norm(param: torch.nn.Parameter, parallel_state: ParallelState) -> bool:
    if getattr(param, "pipeline_duplicate", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.tensor_model_parallel_rank == 0


def _sum_over_gradient_holders(
    value: torch.Tensor, parallel_state: ParallelState, sharded: bool
) -> torch.Tensor:
    """Sum a per-rank tensor (in place, on the device) over the ranks holding distinct gradients: the
    model-parallel ranks of this replica, or every rank when the gradients are sharded over data-parallel
    ranks too."""
    if sharded:
        return parallel_state.all_reduce_world(value)
    return parallel_state.all_reduce_model_parallel(value)


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float, *, keep_empty: bool) -> list[dict]:
    """Two groups: weight decay on matrices, none on parameters marked `no_weight_decay`. Empty groups are
    dropped unless `keep_empty` (sharded optimizers keep the same groups on every rank)."""
    decay = [p for p in params if not getattr(p, "no_weight_decay", False)]
    no_decay = [p for p in params if getattr(p, "no_weight_decay", False)]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"] or keep_empty]


def adamw_implementation(device_type: str) -> dict:
    """torch.optim.AdamW's implementation flag: the fused kernel on CUDA (one launch per few hundred
    parameters, all of AdamW's arithmetic in it), the multi-tensor (foreach) one elsewhere."""
    return {"fused": True} if device_type == "cuda" else {"foreach": True}


def _main_copy(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """An fp32 copy of `param` carrying the same sharding/decay attributes; its grad is `main_grad`."""
    main = torch.nn.Parameter(param.detach().to(torch.float32).clone())
    copy_sharding_attributes(param, main)
    main.grad = param.main_grad
    return main


class MixedPrecisionOptimizer:
    """AdamW over the model's parameters (fp32), over fp32 master copies of them (bf16/fp16), or over
    fp32 master fragments of this rank's shard (distributed optimizer), with bucketed gradient reduction.

    `parallel_config` (`cfg.parallel`, or None) supplies `use_distributed_optimizer`,
    `overlap_grad_reduce`, `overlap_param_gather` and `ddp_bucket_size` (None: all off, Megatron's
    default bucket size).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_config,
        *,
        grad_scaler=None,
        parallel_state: ParallelState | None = None,
        parallel_config=None,
    ) -> None:
        opt = optimizer_config
        if opt.optimizer != "adam":
            raise ValueError(f"--optimizer {opt.optimizer!r} is not supported; valid: 'adam' (AdamW)")
        self.parallel_state = parallel_state or ParallelState.single()
        self.grad_scaler = grad_scaler
        self.clip_grad = opt.clip_grad
        named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named_params]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        distributed = bool(getattr(parallel_config, "use_distributed_optimizer", False))
        overlap_param_gather = bool(getattr(parallel_config, "overlap_param_gather", False))
        if overlap_param_gather and not distributed:
            raise ValueError(
                "--overlap-param-gather needs --use-distributed-optimizer (only the distributed optimizer "
                "all-gathers parameters); add it or drop --overlap-param-gather"
            )
        self.grad_buffer = GradBuffer(
            named_params,
            self.parallel_state,
            bucket_size=getattr(parallel_config, "ddp_bucket_size", None),
            overlap_grad_reduce=bool(getattr(parallel_config, "overlap_grad_reduce", False)),
            shard_over_data_parallel=distributed,
        )
        self.sharded: ShardedMainParams | None = None
        if distributed:
            self.sharded = ShardedMainParams(self.grad_buffer, overlap_param_gather=overlap_param_gather)
            if overlap_param_gather:
                self.sharded.register_forward_pre_hooks(model)
            self.main_params = self.sharded.main_params
        elif self.mixed:
            self.main_params = [_main_copy(p) for p in self.model_params]
        else:
            self.main_params = self.model_params
        device_type = self.model_params[0].device.type if self.model_params else "cpu"
        impl = adamw_implementation(device_type)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.main_params, opt.weight_decay, keep_empty=self.sharded is not None),
            lr=opt.lr,
            betas=(opt.adam_beta1, opt.adam_beta2),
            eps=opt.adam_eps,
            **impl,
        )

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups (the lr scheduler sets `lr` on them)."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float | None:
        return self.grad_scaler.scale if self.grad_scaler is not None else None

    def zero_grad(self) -> None:
        """Clear gradients before the first micro-batch of an iteration."""
        self.grad_buffer.zero_grad()

    def backward(
        self, output: torch.Tensor, *, grad: torch.Tensor | None = None, last_micro_batch: bool = True
    ) -> None:
        """Backpropagate a scalar loss `output` (multiplied by the loss scale under fp16), or with `grad`
        a pipeline stage's output with the gradient received from the next stage (already scaled there).
        With --overlap-grad-reduce the gradient reductions start during the backward passed
        `last_micro_batch=True` (a pipeline passes it for the last backward of each model chunk)."""
        self.grad_buffer.start_backward(last_micro_batch=last_micro_batch)
        if grad is not None:
            backward_from_output(output, grad)  # the output's data may be freed after its send
            return
        if self.grad_scaler is not None:
            output = output * self.grad_scaler.scale
        output.backward()

    def _grads(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """The parameters (for their sharding attributes) whose fp32 gradients this rank steps on."""
        if self.sharded is not None:
            return self.main_params, [main.grad for main in self.main_params]
        return self.model_params, [p.main_grad for p in self.model_params]

    def _unscale(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide the fp32 gradients by the loss scale; returns 1.0 (fp32 scalar on the device) when any
        of this rank's is inf/nan, else 0.0."""
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.grad_buffer.data.device)
        torch._foreach_mul_(grads, 1.0 / self.grad_scaler.scale)
        return torch.stack([~torch.isfinite(g).all() for g in grads]).any().float()

    def prepare_step(self) -> PendingStep:
        """The device half of `step`, with no host read: finish the gradient reduction, unscale (fp16),
        and sum the squared gradient norm (and, fp16, the overflow flags) over the ranks holding distinct
        gradients in one all-reduce. The caller reads `PendingStep.stats` together with whatever else it
        needs on the host (the training step: its loss and the stop flag) and passes the values to
        `finish_step`."""
        self.grad_buffer.finish_grad_sync()
        params, grads = self._grads()
        overflow = self._unscale(grads) if self.grad_scaler is not None else None
        stats = [local_grad_norm_squared(params, grads, self.parallel_state)]  # of the unscaled gradients
        if overflow is not None:
            stats.append(overflow)
        sharded = self.sharded is not None
        reduced = _sum_over_gradient_holders(torch.stack(stats), self.parallel_state, sharded)
        return PendingStep(grads=grads, stats=reduced)

    def finish_step(self, pending: PendingStep, stats: list[float]) -> StepResult:
        """The host half of `step` (`stats`: `pending.stats` read on the host): adapt the loss scale and
        skip an overflowing step (fp16), skip a non-finite gradient norm, else clip and apply AdamW, then
        refresh the model (all-gather under the distributed optimizer)."""
        if self.grad_scaler is not None:
            found_inf = stats[1] > 0
            self.grad_scaler.update(found_inf)
            if found_inf:
                return StepResult(update_successful=False, grad_norm=None, found_inf=True)
        grad_norm = math.sqrt(stats[0])
        if not math.isfinite(grad_norm):
            return StepResult(update_successful=False, grad_norm=grad_norm, found_inf=False)
        clip_grads_(pending.grads, self.clip_grad, grad_norm)
        self.optimizer.step()
        if self.sharded is not None:
            self.sharded.copy_to_model()
        elif self.mixed:
            self._copy_main_to_model()
        return StepResult(update_successful=True, grad_norm=grad_norm, found_inf=False)

    def step(self) -> StepResult:
        """Finish the gradient reduction, unscale (fp16), clip, and apply AdamW unless the gradients
        overflowed or are non-finite; one host read (`prepare_step` then `finish_step`)."""
        pending = self.prepare_step()
        return self.finish_step(pending, pending.stats.tolist())

    @torch.no_grad()
    def params_norm_and_zeros(self) -> tuple[float, int]:
        """(L2 norm of the fp32 parameters AdamW updates, zero entries of their gradients), each weight
        counted once over tensor, pipeline and data-parallel ranks as in the gradient norm (masters, or
        under the distributed optimizer this rank's fragments of them, summed over every rank). After a
        step these are Megatron's `params-norm` (the updated weights) and `num-zeros` (the clipped
        gradients). Collective: one all-reduce of two float64 numbers and one host read; every rank of
        the job must call it."""
        params, grads = self._grads()
        counted = [
            (main, grad)
            for main, param, grad in zip(self.main_params, params, grads, strict=True)
            if _counted_in_norm(param, self.parallel_state)
        ]
        local = torch.zeros(2, dtype=torch.float64, device=self.grad_buffer.data.device)
        if counted:
            norms = torch.stack([torch.linalg.vector_norm(main, dtype=torch.float32) for main, _ in counted])
            local[0] = norms.double().square().sum()
            local[1] = torch.stack([(grad == 0).sum() for _, grad in counted]).sum()
        total = _sum_over_gradient_holders(local, self.parallel_state, self.sharded is not None)
        square, zeros = total.tolist()
        return math.sqrt(square), int(zeros)

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        """Round the updated fp32 masters into the model: one multi-tensor copy (a few kernel launches on
        CUDA for the whole model, not one per parameter)."""
        torch._foreach_copy_(self.model_params, self.main_params)

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers that --overlap-param-gather leaves running after `step`
        (a no-op otherwise): call before reading the model's parameters outside a forward (checkpoint
        save, the replica check); a forward waits on its own, module by module."""
        if self.sharded is not None:
            self.sharded.finish_param_gather()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 master copies from the model (after loading model weights only)."""
        if self.sharded is not None:
            self.sharded.load_from_model()
        elif self.mixed:
            torch._foreach_copy_(self.main_params, self.model_params)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: the fp32 master weights AdamW updates (in fp32
        training without the distributed optimizer, the model's own parameters) and the Adam moments
        (created by the first step). Under the distributed optimizer, about 1/DP of the whole."""
        masters = sum(p.numel() * p.element_size() for p in self.main_params)
        moments = sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for key, value in state.items()
            if key != "step" and torch.is_tensor(value)
        )
        return masters + moments

    @property
    def sharded_over_data_parallel(self) -> bool:
        """True under the distributed optimizer: masters and moments exist only for owned fragments."""
        return self.sharded is not None

    def main_param_pieces(self) -> list[tuple[torch.nn.Parameter, int, torch.nn.Parameter]]:
        """(model parameter, offset into the flattened parameter, fp32 parameter AdamW updates) for
        everything this rank steps on: whole parameters at offset 0 (the model's own in fp32 training,
        else their master copies), or the distributed optimizer's 1-D fragments. Sharded checkpoints
        read and restore the masters and `self.optimizer.state[main]` through these."""
        if self.sharded is not None:
            return [(piece.param, piece.param_start, piece.main) for piece in self.sharded.fragments]
        return [(param, 0, main) for param, main in zip(self.model_params, self.main_params, strict=True)]

    def _refuse_sharded_checkpoint(self) -> None:
        if self.sharded is not None:
            raise NotImplementedError(
                "the single-file checkpoint format cannot hold the distributed optimizer's sharded state; "
                "save sharded checkpoints (what --save writes) or train without --use-distributed-optimizer"
            )

    def state_dict(self) -> dict:
        self._refuse_sharded_checkpoint()
        return {
            "optimizer": self.optimizer.state_dict(),
            "main_params": [p.detach() for p in self.main_params] if self.mixed else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore AdamW moments and fp32 master weights (copied into the model). The grad scaler is
        saved and restored separately by the checkpoint code."""
        self._refuse_sharded_checkpoint()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.mixed:
            if state.get("main_params") is None:
                self.reload_model_params()
            else:
                for main, saved in zip(self.main_params, state["main_params"], strict=True):
                    main.copy_(saved)
                self._copy_main_to_model()


def build_optimizer(
    model: torch.nn.Module,
    optimizer_config,
    *,
    grad_scaler=None,
    parallel_state: ParallelState | None = None,
    parallel_config=None,
) -> MixedPrecisionOptimizer:
    """AdamW for `model` (already cast to its compute dtype) following `optimizer_config`, with data
    parallelism per `parallel_config` (`cfg.parallel`; None: no distributed optimizer, no overlap)."""
    return MixedPrecisionOptimizer(
        model,
        optimizer_config,
        grad_scaler=grad_scaler,
        parallel_state=parallel_state,
        parallel_config=parallel_config,
    )

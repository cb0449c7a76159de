"""AdamW with fp32 master weights, fp32 gradient accumulation, clipping by global norm and loss scaling.

Precision modes:
- fp32: the model parameters are the optimizer's parameters; gradients accumulate in `param.grad`.
- bf16/fp16: the model computes in half precision; each parameter gets an fp32 `main_grad` buffer into
  which its half-precision gradient is added right after it is produced (a post-accumulate-grad hook), so
  accumulation over micro-batches happens in fp32. AdamW updates fp32 copies ("main params") of the
  weights, which are copied back (rounded) into the model after every successful step.
- fp16 additionally multiplies the loss by the grad scaler's scale before backward, unscales the fp32
  gradients before clipping, and skips the whole step when any gradient is inf/nan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.parallel.state import ParallelState

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """What one optimizer step did. `grad_norm` is None when an fp16 overflow skipped the step before it
    was computed."""

    update_successful: bool
    grad_norm: float | None
    found_inf: bool


def clip_grad_norm(
    params: list[torch.nn.Parameter],
    grads: list[torch.Tensor],
    max_norm: float,
    parallel_state: ParallelState,
) -> float:
    """Clip `grads` in place to global L2 norm `max_norm` (no clipping when `max_norm <= 0`) and return
    the norm before clipping, computed in fp32.

    `params[i]` owns `grads[i]` and is only read for its sharding attributes: a parameter replicated
    across tensor-parallel ranks (`tensor_model_parallel` False) counts on TP rank 0 only, so that the
    sum over model-parallel ranks counts each weight once.
    """
    counted = [
        grad
        for param, grad in zip(params, grads, strict=True)
        if getattr(param, "tensor_model_parallel", False) or parallel_state.tensor_model_parallel_rank == 0
    ]
    device = grads[0].device if grads else parallel_state.device
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in counted])
        total_sq = norms.square().sum()
    total_norm = math.sqrt(parallel_state.all_reduce_model_parallel(total_sq).item())
    if max_norm > 0 and math.isfinite(total_norm):
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)
    return total_norm


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices, none on parameters marked `no_weight_decay`."""
    decay = [p for p in params if not getattr(p, "no_weight_decay", False)]
    no_decay = [p for p in params if getattr(p, "no_weight_decay", False)]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


def _main_copy(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """An fp32 copy of `param` carrying the same sharding/decay attributes."""
    main = torch.nn.Parameter(param.detach().to(torch.float32).clone())
    for name in ("no_weight_decay", "tensor_model_parallel", "partition_dim", "shared"):
        if hasattr(param, name):
            setattr(main, name, getattr(param, name))
    return main


def _accumulate_main_grad(param: torch.nn.Parameter) -> None:
    """Move a fresh half-precision gradient into the fp32 accumulator (post-accumulate-grad hook)."""
    param.main_grad.add_(param.grad)
    param.grad = None


class MixedPrecisionOptimizer:
    """AdamW over the model's parameters (fp32) or over fp32 master copies of them (bf16/fp16)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_config,
        *,
        grad_scaler=None,
        parallel_state: ParallelState | None = None,
    ) -> None:
        opt = optimizer_config
        if opt.optimizer != "adam":
            raise ValueError(f"--optimizer {opt.optimizer!r} is not supported; valid: 'adam' (AdamW)")
        self.parallel_state = parallel_state or ParallelState.single()
        self.grad_scaler = grad_scaler
        self.clip_grad = opt.clip_grad
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        self.main_params = [_main_copy(p) for p in self.model_params] if self.mixed else self.model_params
        if self.mixed:
            self._attach_main_grads()
        device_type = self.model_params[0].device.type if self.model_params else "cpu"
        impl = {"fused": True} if device_type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.main_params, opt.weight_decay),
            lr=opt.lr,
            betas=(opt.adam_beta1, opt.adam_beta2),
            eps=opt.adam_eps,
            **impl,
        )

    def _attach_main_grads(self) -> None:
        for param, main in zip(self.model_params, self.main_params, strict=True):
            param.main_grad = torch.zeros_like(main)
            main.grad = param.main_grad
            if not getattr(param, "_main_grad_hooked", False):  # a second optimizer reuses the hook
                param.register_post_accumulate_grad_hook(_accumulate_main_grad)
                param._main_grad_hooked = True

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float | None:
        return self.grad_scaler.scale if self.grad_scaler is not None else None

    def zero_grad(self) -> None:
        """Clear gradients before the first micro-batch of an iteration."""
        for param in self.model_params:
            param.grad = None
            if self.mixed:
                param.main_grad.zero_()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, multiplied by the loss scale under fp16."""
        if self.grad_scaler is not None:
            loss = loss * self.grad_scaler.scale
        loss.backward()

    def _grads(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """The model parameters that have gradients, and their fp32 gradients."""
        if self.mixed:
            return self.model_params, [p.main_grad for p in self.model_params]
        pairs = [(p, p.grad) for p in self.model_params if p.grad is not None]
        return [p for p, _ in pairs], [g for _, g in pairs]

    def _unscale_and_check(self, grads: list[torch.Tensor]) -> bool:
        """Divide the fp32 gradients by the loss scale; True when any of them is inf/nan."""
        if not grads:
            return False
        torch._foreach_mul_(grads, 1.0 / self.grad_scaler.scale)
        nonfinite = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float()
        return bool(self.parallel_state.all_reduce_model_parallel(nonfinite).item() > 0)

    def step(self) -> StepResult:
        """Unscale (fp16), clip, and apply AdamW unless the gradients overflowed or are non-finite."""
        params, grads = self._grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return StepResult(update_successful=False, grad_norm=None, found_inf=True)
        grad_norm = clip_grad_norm(params, grads, self.clip_grad, self.parallel_state)
        if not math.isfinite(grad_norm):
            return StepResult(update_successful=False, grad_norm=grad_norm, found_inf=False)
        self.optimizer.step()
        if self.mixed:
            self._copy_main_to_model()
        return StepResult(update_successful=True, grad_norm=grad_norm, found_inf=False)

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for param, main in zip(self.model_params, self.main_params, strict=True):
            param.copy_(main)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 master copies from the model (after loading model weights only)."""
        if self.mixed:
            for param, main in zip(self.model_params, self.main_params, strict=True):
                main.copy_(param)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "main_params": [p.detach() for p in self.main_params] if self.mixed else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore AdamW moments and fp32 master weights (copied into the model). The grad scaler is
        saved and restored separately by the checkpoint code."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.mixed:
            if state.get("main_params") is None:
                self.reload_model_params()
            else:
                for main, saved in zip(self.main_params, state["main_params"], strict=True):
                    main.copy_(saved)
                self._copy_main_to_model()


def build_optimizer(
    model: torch.nn.Module, optimizer_config, *, grad_scaler=None, parallel_state: ParallelState | None = None
) -> MixedPrecisionOptimizer:
    """AdamW for `model` (already cast to its compute dtype) following `optimizer_config`."""
    return MixedPrecisionOptimizer(
        model, optimizer_config, grad_scaler=grad_scaler, parallel_state=parallel_state
    )

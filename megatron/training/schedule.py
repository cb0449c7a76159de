"""Learning-rate schedule: linear warmup from 0, then linear/cosine/constant decay to `min_lr`.

The schedule counts *samples*, as Megatron's `OptimizerParamScheduler` does: with `--train-iters` the
warmup and decay lengths in iterations are multiplied by the global batch size, with `--train-samples`
the `*_samples` flags are used directly. The scheduler is advanced by `global_batch_size` after every
successful optimizer step, so the update of iteration `i` (1-based) uses `lr(num_steps=(i - 1) * gbs)`:
during warmup the first update has lr 0, and the update at iteration `warmup_iters + 1` is the first at
the full lr (Megatron's convention).
"""

from __future__ import annotations

import math

DECAY_STYLES = ("linear", "cosine", "constant")


class LRScheduler:
    """Megatron's warmup + decay formula over a step counter measured in samples."""

    def __init__(
        self,
        optimizer,
        *,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
        decay_style: str,
    ) -> None:
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={decay_style!r} is not one of {DECAY_STYLES}")
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"min_lr={min_lr} must be between 0 and lr={max_lr}")
        if decay_style != "constant" and decay_steps < warmup_steps:
            raise ValueError(
                f"the lr decay length ({decay_steps} samples) is shorter than the warmup ({warmup_steps} samples)"
            )
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.decay_style = decay_style
        self.num_steps = 0
        self.step(0)

    def get_lr(self, num_steps: int | None = None) -> float:
        """The learning rate after `num_steps` samples (default: the current position)."""
        steps = self.num_steps if num_steps is None else num_steps
        if self.warmup_steps > 0 and steps <= self.warmup_steps:
            return self.max_lr * steps / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if steps > self.decay_steps or self.decay_steps == self.warmup_steps:
            return self.min_lr
        decay_ratio = (steps - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> float:
        """Advance by `increment` samples and set the new lr on every optimizer param group."""
        self.num_steps += increment
        lr = self.get_lr()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "decay_style": self.decay_style,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the shape of the schedule comes from the current config."""
        self.num_steps = int(state["num_steps"])
        self.step(0)


def build_scheduler(
    optimizer, optimizer_config, *, train_iters: int | None, train_samples: int | None, global_batch_size: int
) -> LRScheduler:
    """Resolve warmup/decay lengths (iterations or samples) from the config, as Megatron does."""
    opt = optimizer_config
    if train_iters is not None:
        decay_iters = opt.lr_decay_iters if opt.lr_decay_iters is not None else train_iters
        decay_steps = decay_iters * global_batch_size
        if opt.lr_warmup_fraction is not None:
            warmup_steps = int(opt.lr_warmup_fraction * decay_steps)
        else:
            warmup_steps = (opt.lr_warmup_iters or 0) * global_batch_size
    else:
        if train_samples is None:
            raise ValueError("one of --train-iters or --train-samples is required")
        decay_steps = opt.lr_decay_samples if opt.lr_decay_samples is not None else train_samples
        if opt.lr_warmup_fraction is not None:
            warmup_steps = int(opt.lr_warmup_fraction * decay_steps)
        else:
            warmup_steps = opt.lr_warmup_samples or 0
    return LRScheduler(
        optimizer,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        decay_style=opt.lr_decay_style,
    )

"""Optimizer, learning-rate schedule and loss scaling (`cfg.optimizer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_choice, require_positive, require_range, show

OPTIMIZERS = ("adam",)
LR_DECAY_STYLES = ("linear", "cosine", "constant")


@dataclass
class OptimizerConfig:
    """AdamW with warmup then decay; fp16 loss scaling."""

    optimizer: str = arg("adam", "Optimizer (AdamW with decoupled weight decay).", choices=OPTIMIZERS)
    lr: float | None = arg(None, "Peak learning rate (after warmup).")
    min_lr: float = arg(0.0, "Learning rate at the end of the decay; must be <= --lr.")
    weight_decay: float = arg(0.01, "Decoupled weight decay (not applied to biases and LayerNorm weights).")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.999, "Adam beta2.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    clip_grad: float = arg(1.0, "Clip gradients to this global L2 norm (0 = no clipping).")
    lr_decay_style: str = arg("linear", "Learning-rate decay after warmup.", choices=LR_DECAY_STYLES)
    lr_decay_iters: int | None = arg(None, "Iterations over which the lr decays (default --train-iters).")
    lr_decay_samples: int | None = arg(None, "Samples over which the lr decays (default --train-samples).")
    lr_warmup_iters: int = arg(0, "Linear warmup iterations.")
    lr_warmup_fraction: float | None = arg(
        None, "Warmup as a fraction of the decay iterations (instead of --lr-warmup-iters)."
    )
    lr_warmup_samples: int = arg(0, "Linear warmup samples (with --train-samples).")
    loss_scale: float | None = arg(None, "Static fp16 loss scale (default: dynamic loss scaling).")
    initial_loss_scale: float = arg(2.0**32, "Initial dynamic fp16 loss scale.")
    min_loss_scale: float = arg(1.0, "Smallest dynamic fp16 loss scale.")
    loss_scale_window: int = arg(1000, "Steps without overflow before the dynamic loss scale doubles.")
    hysteresis: int = arg(2, "Overflows tolerated before the dynamic loss scale halves.")

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags and what would be valid."""
        require_choice(self, "optimizer", OPTIMIZERS)
        require_choice(self, "lr_decay_style", LR_DECAY_STYLES)
        require_positive(self, "lr", "adam_eps", "initial_loss_scale", "min_loss_scale")
        require_positive(self, "loss_scale_window", "hysteresis")
        require_positive(self, "loss_scale", "lr_decay_iters", "lr_decay_samples", allow_none=True)
        require_range(self, "adam_beta1", 0.0, 1.0, high_open=True)
        require_range(self, "adam_beta2", 0.0, 1.0, high_open=True)
        require_range(self, "lr_warmup_fraction", 0.0, 1.0)
        for name in ("min_lr", "weight_decay", "clip_grad", "lr_warmup_iters", "lr_warmup_samples"):
            require_range(self, name, 0, math.inf, high_open=True)  # a finite value >= 0
        if self.min_lr > self.lr:
            raise ConfigError(
                f"{show('min_lr', self.min_lr)} is above {show('lr', self.lr)}; use --min-lr <= {self.lr}"
            )
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ConfigError(
                f"both {show('lr_warmup_fraction', self.lr_warmup_fraction)} and "
                f"{show('lr_warmup_iters', self.lr_warmup_iters)} given; use only one of them"
            )

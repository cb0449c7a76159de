"""Loss scaling for fp16 training: a constant scale or Megatron's dynamic scaler.

The dynamic scaler halves the scale after `hysteresis` overflowing steps (never below `min_scale`) and
doubles it after `growth_interval` (`--loss-scale-window`) consecutive clean steps, which also re-arms the
hysteresis. An overflowing step is always skipped by the optimizer, whatever the scaler decides.
"""

from __future__ import annotations


class ConstantGradScaler:
    """A fixed loss scale (`--loss-scale`)."""

    def __init__(self, scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"--loss-scale must be positive, got {scale}")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """Nothing to adapt; the optimizer still skips an overflowing step."""

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler:
    """Megatron's dynamic loss scaler (`--initial-loss-scale`, `--min-loss-scale`,
    `--loss-scale-window`, `--hysteresis`)."""

    def __init__(
        self,
        *,
        initial_scale: float,
        min_scale: float,
        growth_interval: int,
        hysteresis: int,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        if not 0 < min_scale <= initial_scale:
            raise ValueError(
                f"need 0 < --min-loss-scale ({min_scale}) <= --initial-loss-scale ({initial_scale})"
            )
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(
                f"--loss-scale-window ({growth_interval}) and --hysteresis ({hysteresis}) must be >= 1"
            )
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        """Adapt the scale after a step that did (`found_inf`) or did not overflow."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def build_grad_scaler(optimizer_config, *, fp16: bool):
    """The scaler for fp16 (constant when `--loss-scale` is given, else dynamic); None otherwise."""
    if not fp16:
        return None
    opt = optimizer_config
    if opt.loss_scale is not None:
        return ConstantGradScaler(opt.loss_scale)
    return DynamicGradScaler(
        initial_scale=opt.initial_loss_scale,
        min_scale=opt.min_loss_scale,
        growth_interval=opt.loss_scale_window,
        hysteresis=opt.hysteresis,
    )

"""Activation recomputation (Megatron's `--recompute-granularity full|selective`) with RNG replay.

`checkpoint(function, *args, rng_tracker=...)` runs `function(*args)` keeping only what it needs to run
it again (its inputs), and reruns it in backward to rebuild the activations autograd needs. Built on
`torch.utils.checkpoint` (non-reentrant: works with `torch.autograd.grad`, needs no input that requires
grad, and stops recomputing once every needed tensor is back).

RNG replay, so the rerun draws exactly the dropout masks of the first run and the gradients are
bit-identical to no recomputation:
- torch's default stream (CPU, and the CUDA device of the inputs): `preserve_rng_state=True` saves the
  states at forward, sets them for the rerun and puts back the states that were current before it.
- the per-rank stream `parallel_state.rng` (an `RNGTracker`, whose state lives in Python, invisible to
  torch): `_ReplayTracker` does the same with its state dict.

Which layers: `layer_groups(start, end, granularity, method, num_layers)` (full recomputation) follows
Megatron: "uniform" checkpoints consecutive groups of `num_layers` layers of each model chunk, "block"
the first `num_layers` layers of each chunk one by one. "selective" checkpoints only the attention core
(`SelfAttention`), whose activations (the s x s scores and probabilities) are the large, cheap to
recompute ones.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


class _ReplayTracker:
    """Wraps `function` so that its rerun starts the tracker's stream where the first run started it."""

    def __init__(self, function, tracker) -> None:
        self.function = function
        self.tracker = tracker
        self.saved_state = None

    def __call__(self, *args):
        if self.tracker is None:
            return self.function(*args)
        if self.saved_state is None:  # the first run, in forward
            self.saved_state = self.tracker.state_dict()
            return self.function(*args)
        current = self.tracker.state_dict()  # the rerun, in backward
        self.tracker.load_state_dict(self.saved_state)
        try:
            return self.function(*args)
        finally:
            self.tracker.load_state_dict(current)


def checkpoint(function, *args, rng_tracker=None):
    """`function(*args)`, recomputed in backward instead of storing its activations (see the module
    docstring). `rng_tracker`: the per-rank `RNGTracker` the function may draw from (None: only the
    default stream). Without grad mode it simply runs `function(*args)`."""
    if not torch.is_grad_enabled():
        return function(*args)
    return torch.utils.checkpoint.checkpoint(
        _ReplayTracker(function, rng_tracker), *args, use_reentrant=False, preserve_rng_state=True
    )


def layer_groups(
    start: int, end: int, granularity: str | None, method: str | None, num_layers: int | None
) -> list[tuple[int, int, bool]]:
    """The layers [start, end) of one model chunk as consecutive (group start, group end, checkpointed)
    runs: one checkpointed run per group under full recomputation, plain runs otherwise."""
    if granularity != "full":
        return [(start, end, False)]
    if method == "uniform":
        return [(s, min(s + num_layers, end), True) for s in range(start, end, num_layers)]
    if method == "block":
        checkpointed = min(start + num_layers, end)
        plain = [(checkpointed, end, False)] if checkpointed < end else []
        return [(i, i + 1, True) for i in range(start, checkpointed)] + plain
    raise ValueError(
        f"--recompute-method {method!r} is not valid with --recompute-granularity full; use uniform or block"
    )

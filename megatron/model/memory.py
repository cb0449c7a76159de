"""Count the bytes autograd keeps for backward: a measure of activation memory that works on the CPU.

    with SavedActivationCounter() as counter:
        loss = model(tokens, labels=labels).mean()
    counter.peak_bytes   # the most bytes saved for backward at any moment of the forward
    loss.backward()      # (entering the block again also counts what backward's recomputation saves)

Every tensor autograd saves for backward passes through `torch.autograd.graph.saved_tensors_hooks`;
the counter registers each one's storage (keyed by its data pointer and device, so views and repeated
saves of one tensor count once) and forgets it when the last saved reference to that storage is freed
(autograd drops saved tensors as backward consumes them, or with the graph). `current_bytes` is what is
held now, `peak_bytes` the maximum.

What it does not see: tensors kept alive by other means (a custom autograd Function's Python attributes,
module caches) and what an inner `saved_tensors_hooks` (e.g. a checkpointed region's) takes over: the
point of recomputation is that those are not stored.
"""

from __future__ import annotations

import torch


class _Saved:
    """What autograd holds instead of a saved tensor: the tensor, plus a release callback when freed."""

    __slots__ = ("tensor", "_release")

    def __init__(self, tensor: torch.Tensor, release) -> None:
        self.tensor = tensor
        self._release = release

    def __del__(self) -> None:
        self._release()


class SavedActivationCounter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager counting the bytes of tensors saved for backward (see the module docstring).

    Parameters are counted too when an op saves them (a matmul saves its weight); `exclude` (tensors,
    e.g. `model.parameters()`) leaves their storages out so only activations count.
    """

    def __init__(self, exclude=()) -> None:
        self._references: dict[tuple, int] = {}  # storage key -> saved references alive
        self._sizes: dict[tuple, int] = {}
        self._excluded = {_storage_key(t) for t in exclude}
        self.current_bytes = 0
        self.peak_bytes = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedActivationCounter:
        super().__enter__()
        return self

    def reset_peak(self) -> None:
        """Start a new peak measurement from what is held now."""
        self.peak_bytes = self.current_bytes

    def _pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key in self._excluded or tensor.device.type == "meta":
            return tensor
        if self._references.get(key, 0) == 0:
            size = tensor.untyped_storage().nbytes()
            self._sizes[key] = size
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._references[key] = self._references.get(key, 0) + 1
        return _Saved(tensor, lambda: self._release(key))

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: tuple) -> None:
        self._references[key] -= 1
        if self._references[key] == 0:
            del self._references[key]
            self.current_bytes -= self._sizes.pop(key)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())

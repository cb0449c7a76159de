"""One-process readers of sharded checkpoints (tools, generation, conversion): full logical tensors
whatever the saving layout, without torch.distributed. They verify the checkpoint against its manifest
first, as training does (`verify.verify_checkpoint`: every file's size and checksum; a flipped byte is
refused, naming the file), unless the caller already did (`verify=False`). See docs/checkpoints.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from megatron.checkpoint.dcp_io import dcp_load, read_metadata
from megatron.checkpoint.verify import verify_checkpoint


def tensor_metadata(directory, prefix: str = "model/") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name (without `prefix`) -> (full logical shape, dtype) of every tensor under `prefix`, from the
    DCP metadata alone (no tensor data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory)
    return {
        key[len(prefix) :]: (tuple(entry.size), entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def iter_tensors(
    directory, prefix: str = "model/", *, verify: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name without `prefix`, full tensor) for every tensor under `prefix`, one at a time (only that
    tensor's bytes are read), in one process without torch.distributed, whatever the saving layout.
    `verify`: check the whole checkpoint against its manifest before the first tensor (ValueError
    naming the damaged file); False where the caller has verified it."""
    directory = Path(directory)
    if verify:
        verify_checkpoint(directory)
    for name, (shape, dtype) in tensor_metadata(directory, prefix).items():
        tensor = torch.empty(shape, dtype=dtype)
        dcp_load({prefix + name: tensor}, directory, None)
        yield name, tensor


def load_full_state(directory, prefix: str = "model/", *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` at its full logical shape (name without `prefix` -> tensor), in one
    process without torch.distributed, whatever the saving layout (tools, generation, conversion).
    `verify`: check the checkpoint against its manifest first (ValueError naming the damaged file)."""
    directory = Path(directory)
    if verify:
        verify_checkpoint(directory)
    state = {
        prefix + name: torch.empty(shape, dtype=dtype)
        for name, (shape, dtype) in tensor_metadata(directory, prefix).items()
    }
    if state:
        dcp_load(state, directory, None)
    return {key[len(prefix) :]: tensor for key, tensor in state.items()}

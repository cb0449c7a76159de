"""Arbitrary rectangular chunks of logical tensors in torch.distributed.checkpoint (DCP): what the
distributed optimizer's fragments become in a sharded checkpoint, and the DCP planners that write and
read them. See docs/checkpoints.md.

A distributed-optimizer fragment is a flat range `[start, stop)` of a tensor-parallel-local parameter
flattened row-major. In the logical (full) tensor that range is at most `2 * (ndim - 1) + 1` rectangular
boxes (for a matrix: a partial first row, the full rows, a partial last row), shifted by where this
tensor-parallel rank's block sits. DTensor cannot express such chunks, so `LogicalChunks` carries them
and the chunk planners (`chunk_save_planner()`, `chunk_load_planner()`: DCP's default planners plus
these values) turn each box into one write item, or into the read items that cover it from whatever
chunks were saved. Every other
value (plain tensors, DTensors, bytes) goes through DCP's default planning unchanged.

`CHECKPOINT_BYTES` counts what this process staged and read (tensor payload), per key prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch


def flat_range_boxes(start: int, stop: int, shape) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Elements `[start, stop)` of a row-major tensor of `shape` (flattened) as rectangular boxes, in
    element order: (flat index of the box's first element, offsets, sizes) each."""
    shape = tuple(shape)
    assert shape and 0 <= start <= stop <= math.prod(shape), (start, stop, shape)
    if start == stop:
        return []
    if len(shape) == 1:
        return [(start, (start,), (stop - start,))]
    row = math.prod(shape[1:])
    boxes, position = [], start
    if position % row:  # a partial first row
        end = min(stop, (position // row + 1) * row)
        boxes += _within_row(position, end, shape)
        position = end
    full = (stop - position) // row
    if full:
        zeros = (0,) * (len(shape) - 1)
        boxes.append((position, (position // row,) + zeros, (full,) + shape[1:]))
        position += full * row
    if position < stop:  # a partial last row
        boxes += _within_row(position, stop, shape)
    return boxes


def _within_row(start: int, stop: int, shape: tuple[int, ...]) -> list:
    """`flat_range_boxes` for a range inside one row (one index of the first dimension)."""
    row = math.prod(shape[1:])
    index = start // row
    return [
        (index * row + flat, (index,) + offsets, (1,) + sizes)
        for flat, offsets, sizes in flat_range_boxes(start - index * row, stop - index * row, shape[1:])
    ]


def block_offsets(param: torch.nn.Parameter, tp_rank: int) -> tuple[int, ...]:
    """Where this tensor-parallel rank's block of `param` starts in the logical tensor (contiguous
    equal blocks along `partition_dim`, as the model weights are saved)."""
    offsets = [0] * param.dim()
    if getattr(param, "tensor_model_parallel", False):
        offsets[param.partition_dim] = tp_rank * param.shape[param.partition_dim]
    full = tuple(getattr(param, "full_shape", param.shape))
    assert all(o + s <= f for o, s, f in zip(offsets, param.shape, full, strict=True)), (offsets, full)
    return tuple(offsets)


@dataclass
class LogicalChunks:
    """Boxes of one logical tensor of `size` that this rank writes, or reads into: (offsets in the
    logical tensor, CPU tensor of the box's shape) each. A state-dict value for the chunk planners."""

    size: tuple[int, ...]
    dtype: torch.dtype
    boxes: list[tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(box.numel() * box.element_size() for _, box in self.boxes)


def fragment_boxes(
    param: torch.nn.Parameter, tp_rank: int, offset: int, numel: int
) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Elements `[offset, offset + numel)` of the flattened tensor-parallel-local `param` as boxes of the
    logical tensor: (index of the box's first element in the fragment, logical offsets, sizes) each."""
    base = block_offsets(param, tp_rank)
    return [
        (flat - offset, tuple(b + o for b, o in zip(base, offsets, strict=True)), sizes)
        for flat, offsets, sizes in flat_range_boxes(offset, offset + numel, param.shape)
    ]


def logical_chunks(param: torch.nn.Parameter) -> LogicalChunks:
    """No boxes yet of `param`'s logical tensor, in fp32 (optimizer state)."""
    return LogicalChunks(tuple(getattr(param, "full_shape", param.shape)), torch.float32)


def fragment_chunks(
    param: torch.nn.Parameter, tp_rank: int, fragments: list[tuple[int, torch.Tensor]]
) -> LogicalChunks:
    """`fragments` (offset into the flattened tensor-parallel-local `param`, flat fp32 CPU values) as
    chunks of the logical tensor; each box is a view of its fragment's values (so loading into the boxes
    fills the fragments)."""
    chunks = logical_chunks(param)
    for offset, values in fragments:
        assert values.dim() == 1 and values.dtype == torch.float32, (values.shape, values.dtype)
        for start, offsets, sizes in fragment_boxes(param, tp_rank, offset, values.numel()):
            chunks.boxes.append((offsets, values[start : start + math.prod(sizes)].view(sizes)))
    return chunks


def _split(state_dict: dict) -> tuple[dict, dict[str, LogicalChunks]]:
    chunks = {key: value for key, value in state_dict.items() if isinstance(value, LogicalChunks)}
    return {key: value for key, value in state_dict.items() if key not in chunks}, chunks


def _box_index(chunks: dict[str, LogicalChunks]) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    return {(key, offsets): box for key, value in chunks.items() for offsets, box in value.boxes}


def chunk_save_planner():
    """A fresh `ChunkSavePlanner` (DCP is imported on first use)."""
    return _save_planner_class()()


def chunk_load_planner():
    """A fresh `ChunkLoadPlanner` (DCP is imported on first use)."""
    return _load_planner_class()()


@functools.cache
def _save_planner_class():
    from torch.distributed.checkpoint import DefaultSavePlanner

    class ChunkSavePlanner(DefaultSavePlanner):
        """DCP's default save planner, plus `LogicalChunks` values: one write item per box."""

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
            rest, self.chunks = _split(state_dict)
            self.boxes = _box_index(self.chunks)
            super().set_up_planner(rest, storage_meta=storage_meta, is_coordinator=is_coordinator)

        def create_local_plan(self):
            from torch.distributed.checkpoint.metadata import (
                ChunkStorageMetadata,
                MetadataIndex,
                TensorProperties,
            )
            from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

            plan = super().create_local_plan()
            items = [
                WriteItem(
                    index=MetadataIndex(key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=box.size()),
                        properties=TensorProperties.create_from_tensor(box),
                        size=torch.Size(self.chunks[key].size),
                    ),
                )
                for (key, offsets), box in self.boxes.items()
            ]
            planner_data = plan.planner_data
            if isinstance(planner_data, dict):  # flattening mappings: each key is its own path
                planner_data = {**planner_data, **{key: (key,) for key in self.chunks}}
            self.plan = dataclasses.replace(plan, items=plan.items + items, planner_data=planner_data)
            return self.plan

        def resolve_data(self, write_item):
            box = self.boxes.get((write_item.index.fqn, tuple(write_item.index.offset or ())))
            return box if box is not None else super().resolve_data(write_item)

    return ChunkSavePlanner


@functools.cache
def _load_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, plus `LogicalChunks` values: each box is filled from every saved
        chunk it overlaps (any saving layout). Counts the bytes read into `CHECKPOINT_BYTES`."""

        def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
            rest, self.chunks = _split(state_dict)
            self.boxes = _box_index(self.chunks)
            super().set_up_planner(rest, metadata=metadata, is_coordinator=is_coordinator)

        def create_local_plan(self):
            from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
            from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

            plan = super().create_local_plan()
            items = []
            for key, value in self.chunks.items():
                saved = self.metadata.state_dict_metadata.get(key)
                if not isinstance(saved, TensorStorageMetadata) or tuple(saved.size) != tuple(value.size):
                    raise RuntimeError(
                        f"{key}: not in the checkpoint as a tensor of shape {list(value.size)}"
                    )
                wanted = [
                    ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=box.size())
                    for offsets, box in value.boxes
                ]
                items += create_read_items_for_chunk_list(key, saved, wanted)
            return dataclasses.replace(plan, items=plan.items + items)

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            for item in plan.items:
                CHECKPOINT_BYTES.add("read", item.storage_index.fqn, _stored_bytes(self.metadata, item))
            return plan

        def lookup_tensor(self, index):
            box = self.boxes.get((index.fqn, tuple(index.offset or ())))
            return box if box is not None else super().lookup_tensor(index)

    return ChunkLoadPlanner


def _stored_bytes(metadata, item) -> int:
    """Payload bytes of the region of a saved chunk that `item` reads (the data files are memory-mapped
    and each tensor narrowed before its copy, so only that region's pages are touched)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = metadata.state_dict_metadata[item.storage_index.fqn]
    if not isinstance(saved, TensorStorageMetadata):
        return 0
    return math.prod(item.lengths) * saved.properties.dtype.itemsize


class CheckpointBytes:
    """Tensor payload bytes this process staged for saves (`staged`) and read at loads (`read`: the
    regions of the saved chunks it asked for), by the key's first part ("model", "optimizer", "rng").
    `reset()` between measurements."""

    def __init__(self) -> None:
        self.staged: dict[str, int] = {}
        self.read: dict[str, int] = {}

    def reset(self) -> None:
        self.staged.clear()
        self.read.clear()

    def add(self, what: str, key: str, nbytes: int) -> None:
        counts = getattr(self, what)
        prefix = key.split("/", 1)[0]
        counts[prefix] = counts.get(prefix, 0) + int(nbytes)


CHECKPOINT_BYTES = CheckpointBytes()

"""Loading data-parallel-replicated tensors once per data-parallel group: the model weights (and the
optimizer state without the distributed optimizer) are identical on the DP ranks of one (tensor,
pipeline) position, so instead of every rank reading all of them, the ranks of the DP group split the
reading and exchange what they read over the DP group. See docs/checkpoints.md.

Who reads what (every rank of the group computes the same plan from the checkpoint's metadata):
- A tensor whose TP-local chunk was saved exactly (the same offsets and shape) in the data file of one of
  the group's ranks (`__<rank>_0.distcp`: DCP's save gives each replicated chunk to one writer) is read
  whole by that rank and broadcast from it, unless that would leave one rank reading more than its share
  plus one tensor (a checkpoint saved by fewer ranks). At the saving layout that is every replicated tensor, so
  each rank reads exactly its own file (with its optimizer fragments and generator states), which is
  then checksummed as it is read: every file is read once by the whole job and none is hashed after.
- Every other tensor (another layout: resharding) is split evenly: the group's tensors of one dtype are
  laid end to end in one flat buffer, each rank reads its 1/DP flat range (as rectangular boxes of the
  logical tensors, `fragments.fragment_boxes`) from whichever saved chunks hold it, and the group
  all-gathers the buffer in place.

Host memory: the flat buffers are the CPU buffers the load needs anyway (the padding of the split part
to a multiple of the DP size aside). The exchange runs on the DP group of `ParallelState`
(`collectives`, so `COMM_BYTES` counts it): on CPU tensors over gloo, through device copies of at most
`DEVICE_CHUNK_BYTES` under NCCL. Nothing here touches the model: the checksums are checked after the
exchange and only then is anything copied into it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from megatron.checkpoint.fragments import LogicalChunks, block_offsets, fragment_boxes
from megatron.parallel import collectives
from megatron.parallel.state import ParallelState

# the data file DCP writes for one saving rank (FileSystemWriter, single_file_per_rank)
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")

# bytes per collective: through the device under NCCL (the size of its staging copies); None (one
# collective per reader and one all-gather, in place in the CPU buffer) over gloo
DEVICE_CHUNK_BYTES = 256 << 20
CPU_CHUNK_BYTES: int | None = None


@dataclass
class _Flat:
    """The replicated tensors of one dtype in one flat buffer: `segments` (reader, start, stop) hold the
    tensors read whole, grouped by reader; from `region` on, DP x `share` elements split evenly."""

    buffer: torch.Tensor
    segments: list[tuple[int, int, int]]
    region: int
    share: int


class ReplicatedRead:
    """One rank's part of a DP group's load of its replicated tensors: `tensors` (key -> the whole
    TP-local tensor, filled once `exchange` ran), `requests` (key -> the boxes this rank reads, a
    state-dict value for `dcp_io.dcp_load`)."""

    def __init__(self, entries: dict, metadata, parallel_state: ParallelState) -> None:
        self.group = parallel_state.dp_group
        self.tp_rank = parallel_state.tensor_model_parallel_rank
        backend = parallel_state.backend or ""
        self.device = parallel_state.device if "nccl" in backend else torch.device("cpu")
        self.tensors: dict[str, torch.Tensor] = {}
        self.requests: dict[str, LogicalChunks] = {}
        self.flats: list[_Flat] = []
        dp_ranks = self.group.ranks
        readers = {
            key: _reader(key, param, self.tp_rank, metadata, dp_ranks) for key, (param, _) in entries.items()
        }
        readers = _balanced(readers, entries, self.group.size)
        dtypes = dict.fromkeys(dtype for _, dtype in entries.values())  # first seen first, on every rank
        for dtype in dtypes:
            keys = [key for key, (_, d) in entries.items() if d == dtype]
            self.flats.append(self._lay_out(keys, entries, readers, dtype))

    def _lay_out(self, keys: list[str], entries: dict, readers: dict, dtype: torch.dtype) -> _Flat:
        whole = sorted((key for key in keys if readers[key] is not None), key=lambda key: readers[key])
        split = [key for key in keys if readers[key] is None]
        spans, segments, position = {}, [], 0
        for key in whole:
            numel = entries[key][0].numel()
            spans[key] = position
            if segments and segments[-1][0] == readers[key]:
                segments[-1] = (readers[key], segments[-1][1], position + numel)
            else:
                segments.append((readers[key], position, position + numel))
            position += numel
        region = position
        for key in split:
            spans[key] = position
            position += entries[key][0].numel()
        share = math.ceil((position - region) / self.group.size)
        flat = _Flat(torch.empty(region + share * self.group.size, dtype=dtype), segments, region, share)
        mine = (region + self.group.rank * share, region + (self.group.rank + 1) * share)
        for key in keys:
            param = entries[key][0]
            start = spans[key]
            values = flat.buffer[start : start + param.numel()]
            self.tensors[key] = values.view(param.shape)
            if readers[key] is not None:
                if readers[key] == self.group.rank:
                    self.requests[key] = self._chunks(param, dtype, values, 0, param.numel())
                continue
            low, high = max(start, mine[0]) - start, min(start + param.numel(), mine[1]) - start
            if low < high:
                self.requests[key] = self._chunks(param, dtype, values, low, high)
        return flat

    def _chunks(self, param, dtype, values: torch.Tensor, low: int, high: int) -> LogicalChunks:
        """Elements [low, high) of `param`'s flattened TP-local tensor as boxes of the logical tensor, each a
        view of `values` (so reading into the boxes fills the tensor)."""
        chunks = LogicalChunks(tuple(getattr(param, "full_shape", param.shape)), dtype)
        for first, offsets, sizes in fragment_boxes(param, self.tp_rank, low, high - low):
            begin = low + first
            chunks.boxes.append((offsets, values[begin : begin + math.prod(sizes)].view(sizes)))
        return chunks

    def exchange(self) -> None:
        """Collective over the DP group, after every rank's read: each reader's tensors broadcast from it,
        then the evenly split part all-gathered. Afterwards `tensors` hold the whole TP-local tensors."""
        chunk_bytes = CPU_CHUNK_BYTES if self.device.type == "cpu" else DEVICE_CHUNK_BYTES
        for flat in self.flats:
            size = flat.buffer.element_size()
            for reader, start, stop in flat.segments:
                for low, high in _pieces(start, stop, chunk_bytes and chunk_bytes // size):
                    self._broadcast(flat.buffer[low:high], reader)
            rows = flat.buffer[flat.region :].view(self.group.size, flat.share)
            for low, high in _pieces(0, flat.share, chunk_bytes and chunk_bytes // (size * self.group.size)):
                self._all_gather(rows, low, high)

    def _broadcast(self, piece: torch.Tensor, reader: int) -> None:
        if self.device == piece.device:
            collectives.broadcast(piece, self.group, reader)
            return
        staged = (
            piece.to(self.device)
            if reader == self.group.rank
            else torch.empty_like(piece, device=self.device)
        )
        collectives.broadcast(staged, self.group, reader)
        piece.copy_(staged)

    def _all_gather(self, rows: torch.Tensor, low: int, high: int) -> None:
        """Columns [low, high) of every rank's share (`rows`: one row per rank) from their owners."""
        mine = rows[self.group.rank, low:high]
        if self.device == rows.device and high - low == rows.shape[1]:  # the whole buffer, in place
            whole = rows.view(-1)
            collectives.wait(collectives.all_gather_into_tensor_async(whole, mine, self.group))
            return
        gathered = torch.empty(self.group.size * (high - low), dtype=rows.dtype, device=self.device)
        collectives.wait(collectives.all_gather_into_tensor_async(gathered, mine.to(self.device), self.group))
        rows[:, low:high].copy_(gathered.view(self.group.size, high - low))


def _balanced(readers: dict, entries: dict, size: int) -> dict:
    """`readers`, or no reader at all (every tensor split evenly) when one rank would read more than its
    1/DP share of the bytes plus one tensor: a checkpoint saved by fewer ranks (one process: all in
    `__0_0.distcp`). At the saving layout DCP's save gave each tensor to the replica with the fewest
    bytes so far, which keeps every rank within that bound."""
    nbytes = {key: param.numel() * dtype.itemsize for key, (param, dtype) in entries.items()}
    per_reader = [0] * size
    for key, reader in readers.items():
        if reader is not None:
            per_reader[reader] += nbytes[key]
    if nbytes and max(per_reader) > sum(nbytes.values()) / size + max(nbytes.values()):
        return dict.fromkeys(readers)
    return readers


def _pieces(start: int, stop: int, step: int | None) -> list[tuple[int, int]]:
    """[start, stop) in consecutive pieces of `step` elements (at least one; None: one piece)."""
    step = max(1, step) if step is not None else max(1, stop - start)
    return [(low, min(stop, low + step)) for low in range(start, stop, step)]


def _reader(
    key: str, param: torch.nn.Parameter, tp_rank: int, metadata, dp_ranks: tuple[int, ...]
) -> int | None:
    """The index in the DP group of the rank whose own data file holds `key`'s TP-local chunk exactly
    (offsets and shape), else None (read split)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    offsets = block_offsets(param, tp_rank)
    saved = metadata.state_dict_metadata.get(key)
    chunks = getattr(saved, "chunks", ())
    if not any(tuple(c.offsets) == offsets and tuple(c.sizes) == tuple(param.shape) for c in chunks):
        return None
    info = metadata.storage_data.get(MetadataIndex(key, offsets))
    match = _RANK_FILE.match(getattr(info, "relative_path", "") or "")
    if match is None or int(match.group(1)) not in dp_ranks:
        return None
    return dp_ranks.index(int(match.group(1)))

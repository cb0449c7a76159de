"""The data-file stream layer (megatron/checkpoint/dcp_streams.py) and what the checkpointer builds on it:
a file read whole is read front to back with the CRC32 of every byte taken in file order, a tensor whose
stored record is its whole destination is read straight into it (the model's parameters and live Adam
moments), narrowed and strided reads equal the slice of a whole read, and damaged files are named.
Counts and bytes, no timings (bench/checkpoint_io.py measures those).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import Checkpointer, dcp_streams
from megatron.checkpoint.dcp_io import dcp_load, dcp_save, read_metadata
from megatron.checkpoint.dcp_streams import checksummed_reads
from megatron.checkpoint.files import file_entry
from megatron.checkpoint.fragments import LogicalChunks
from megatron.config import OptimizerConfig
from megatron.model import GPTModel
from megatron.parallel.state import ParallelState
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
VOCAB = 512
SEQ = 8


def tensors() -> dict[str, torch.Tensor]:
    """Items above and below the head size (64 KiB), several dtypes, one stored with its strides."""
    generator = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(300, 257, generator=generator),
        "big_bf16": torch.randn(129, 700, generator=generator).to(torch.bfloat16),
        "ints": torch.arange(40_000, dtype=torch.int64),
        "transposed": torch.randn(400, 300, generator=generator).t(),  # saved with stride (1, 400)
        "small": torch.randn(7, 3, generator=generator),
        "scalar": torch.tensor(3.5),
    }


def data_file(directory: Path) -> Path:
    [path] = directory.glob("*.distcp")
    return path


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    state = tensors()
    entries = dcp_save(dict(state), tmp_path, None)
    return tmp_path, {"state": state, "entries": entries}


def record_destinations(monkeypatch) -> list[tuple[tuple, bool]]:
    """(stored size, read straight into the destination) of every tensor item streamed."""
    seen, original = [], dcp_streams._whole_destination

    def whole_destination(recipe, request, target):
        result = original(recipe, request, target)
        seen.append((recipe.size, result))
        return result

    monkeypatch.setattr(dcp_streams, "_whole_destination", whole_destination)
    return seen


def test_a_file_read_whole_is_checksummed_over_every_byte(saved, monkeypatch):
    directory, info = saved
    seen = record_destinations(monkeypatch)
    target = {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in info["state"].items()}
    pointers = {key: value.data_ptr() for key, value in target.items()}
    with checksummed_reads() as found:
        dcp_load(target, directory, None)
    path = data_file(directory)
    # the CRC32 taken while reading is zlib's CRC32 of the whole file, and what the save recorded
    assert found == {path.name: file_entry(path)} == {path.name: info["entries"][path.name]}
    assert found[path.name]["crc32"] == f"{zlib.crc32(path.read_bytes()):08x}"
    for key, value in info["state"].items():
        assert torch.equal(target[key], value), key
        assert target[key].data_ptr() == pointers[key], key
    # every contiguous item went straight into its destination (the data beyond the 64 KiB head read
    # into it); the transposed one (stored with its strides) through a scratch buffer
    assert sorted(seen) == sorted(
        [((300, 257), True), ((129, 700), True), ((40_000,), True), ((7, 3), True), ((), True)]
        + [((300, 400), False)]
    )


def test_narrowed_and_strided_reads_equal_the_slices_of_a_whole_read(saved):
    """Several boxes of one stored item (read once, streamed) and one box of a file read in part (mapped)."""
    directory, info = saved
    big, transposed = info["state"]["big"], info["state"]["transposed"]
    boxes = {(0, 0): big[:100], (100, 0): big[100:, :127], (100, 127): big[100:, 127:]}
    chunks = LogicalChunks((300, 257), torch.float32, [(o, torch.zeros_like(b)) for o, b in boxes.items()])
    state = {key: torch.zeros(v.shape, dtype=v.dtype) for key, v in info["state"].items() if key != "big"}
    state["big"] = chunks
    with checksummed_reads() as found:
        dcp_load(state, directory, None)
    assert list(found) == [data_file(directory).name]  # every byte still read, once, in order
    for (offsets, box), expected in zip(chunks.boxes, boxes.values(), strict=True):
        assert torch.equal(box, expected), offsets
    assert torch.equal(state["transposed"], transposed)
    part = LogicalChunks((300, 400), torch.float32, [((10, 33), torch.zeros(50, 60))])
    with checksummed_reads() as found:
        dcp_load({"transposed": part}, directory, None)
    assert found == {}  # read in part: hashed by the checkpointer afterwards
    assert torch.equal(part.boxes[0][1], transposed[10:60, 33:93])


def test_a_layout_other_than_the_guess_is_read_by_torch_instead(saved, monkeypatch):
    """The head's guess of where an item's data starts is confirmed by torch's zip reader once the item is
    read; a wrong guess (as from another writer) falls back to torch's own reading of the bytes."""
    directory, info = saved
    original, confirmed = dcp_streams._guess_layout, dcp_streams._layout_confirmed
    verdicts = []

    def off_by_64(head, cache):
        guess = original(head, cache)
        return None if guess is None else (guess[0], guess[1] + 64)

    def layout_confirmed(*args):
        verdicts.append(confirmed(*args))
        return verdicts[-1]

    monkeypatch.setattr(dcp_streams, "_guess_layout", off_by_64)
    monkeypatch.setattr(dcp_streams, "_layout_confirmed", layout_confirmed)
    target = {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in info["state"].items()}
    with checksummed_reads() as found:
        dcp_load(target, directory, None)
    assert verdicts == [False] * 6  # every item, each then read by torch
    assert found[data_file(directory).name] == info["entries"][data_file(directory).name]
    for key, value in info["state"].items():
        assert torch.equal(target[key], value), key


def test_a_short_file_is_named(saved):
    directory, info = saved
    path = data_file(directory)
    path.write_bytes(path.read_bytes()[:-1000])
    target = {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in info["state"].items()}
    with pytest.raises(ValueError, match=f"{path}: {path.stat().st_size} bytes, .* up to byte .*truncated"):
        dcp_load(target, directory, None)
    stream = dcp_streams._Sequential(io.BytesIO(b"abc"), path, None)  # a file that shrinks while read
    with pytest.raises(ValueError, match=f"{path}: ends at byte 3, .* up to byte 5 \\(truncated\\)"):
        stream.read_into(memoryview(bytearray(5)))


# --------------------------------------------------------------------------- through the checkpointer


def build():
    """(state, model, optimizer) of a model whose larger tensors are streamed (above 64 KiB)."""
    from megatron.training.optimizer import build_optimizer

    state = ParallelState.single("cpu")
    state.seed(5)
    config = tiny_model_config(num_layers=1, hidden_size=128, seq_length=SEQ, dropout=0.0)
    model = GPTModel(config, VOCAB, state)
    model.init_weights(5)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2), parallel_state=state)
    return state, model, optimizer


def train(state, model, optimizer, seed: int) -> None:
    from megatron.training.step import train_step

    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ)}
    train_step(model, optimizer, [batch], state)


def snapshot(model, optimizer) -> dict[str, torch.Tensor]:
    found = {f"model/{name}": p.detach().clone() for name, p in model.named_parameters()}
    for index, state in enumerate(optimizer.optimizer.state.values()):
        found.update({f"{kind}/{index}": state[kind].clone() for kind in ("exp_avg", "exp_avg_sq")})
    return found


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def largest_item(directory: Path, prefix: str) -> tuple[int, int]:
    """(offset, length) in the data file of the largest stored item whose key starts with `prefix`."""
    items = read_metadata(directory).storage_data.items()
    found = [(info.length, info.offset) for index, info in items if index.fqn.startswith(prefix)]
    length, offset = max(found)
    return offset, length


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "zip header", "pickle"])
def test_a_flipped_byte_is_named_wherever_it_is(tmp_path, where):
    state, model, optimizer = build()
    train(state, model, optimizer, 0)
    Checkpointer(state).save(tmp_path, 1, model, optimizer, None, None, consumed_samples=2, config={})
    shard = data_file(tmp_path / "iter_0000001")
    offset, length = largest_item(tmp_path / "iter_0000001", "model/")
    assert length > dcp_streams._HEAD_BYTES  # a streamed item
    flip(shard, offset + {"data": length // 2, "zip header": 11, "pickle": 120}[where])
    state, model, optimizer = build()
    with pytest.raises(ValueError, match=f"{shard}: CRC32 hash differs"):
        Checkpointer(state).load(tmp_path, model, optimizer, None, None)


def test_a_corrupt_checkpoint_read_into_live_state_falls_back_and_overwrites_it_all(tmp_path, monkeypatch):
    """A rollback's load (live weights and Adam moments, read in place) meeting corrupt data: the older
    complete checkpoint it falls back to overwrites every parameter and moment."""
    state, model, optimizer = build()
    checkpointer = Checkpointer(state)
    train(state, model, optimizer, 0)
    checkpointer.save(tmp_path, 1, model, optimizer, None, None, consumed_samples=2, config={})
    expected = snapshot(model, optimizer)
    train(state, model, optimizer, 1)
    checkpointer.save(tmp_path, 2, model, optimizer, None, None, consumed_samples=4, config={})
    shard = data_file(tmp_path / "iter_0000002")
    for prefix in ("model/", "optimizer/exp_avg_sq/"):
        offset, length = largest_item(tmp_path / "iter_0000002", prefix)
        flip(shard, offset + length - 2000)
    train(state, model, optimizer, 2)
    pointers = {key: value.data_ptr() for key, value in snapshot_views(model, optimizer).items()}
    seen = record_destinations(monkeypatch)
    loaded = Checkpointer(state).load(tmp_path, model, optimizer, None, None)
    assert loaded.iteration == 1
    assert_same(snapshot(model, optimizer), expected)
    assert {key: value.data_ptr() for key, value in snapshot_views(model, optimizer).items()} == pointers
    streamed = len([size for size, _ in seen])
    assert streamed and [direct for _, direct in seen] == [True] * streamed  # both loads, in place


def snapshot_views(model, optimizer) -> dict[str, torch.Tensor]:
    found = {f"model/{name}": p for name, p in model.named_parameters()}
    for index, state in enumerate(optimizer.optimizer.state.values()):
        found.update({f"{kind}/{index}": state[kind] for kind in ("exp_avg", "exp_avg_sq")})
    return found


def test_a_fallback_to_a_checkpoint_without_optimizer_state_leaves_fresh_moments(tmp_path):
    state, model, optimizer = build()
    checkpointer = Checkpointer(state)
    checkpointer.save(tmp_path, 1, model, None, None, None, consumed_samples=0, config={})
    expected = snapshot(model, optimizer)  # weights only: no optimizer state yet
    train(state, model, optimizer, 0)
    checkpointer.save(tmp_path, 2, model, optimizer, None, None, consumed_samples=2, config={})
    offset, length = largest_item(tmp_path / "iter_0000002", "optimizer/exp_avg/")
    flip(data_file(tmp_path / "iter_0000002"), offset + length - 2000)
    train(state, model, optimizer, 1)  # live moments, read into in place by the corrupt checkpoint
    assert Checkpointer(state).load(tmp_path, model, optimizer, None, None).iteration == 1
    assert not optimizer.optimizer.state  # fresh, as the log says; nothing of the corrupt read is kept
    assert_same(snapshot(model, optimizer), expected)


def test_the_writer_checksums_what_passes_and_names_a_full_disk(tmp_path):
    """A save's data file: its manifest entry comes from the bytes written (small and large writes), and
    ENOSPC, which the kernel reports without a file name, is raised naming the file."""
    import errno
    import os

    from megatron.checkpoint.files import ChecksumWriter

    path = tmp_path / "__0_0.distcp"
    writer = ChecksumWriter(path)
    for chunk in [os.urandom(100) for _ in range(300)] + [os.urandom(3 << 20), b"tail"]:
        writer.write(chunk)
    writer.close()
    assert writer.entry() == file_entry(path) and writer.entry()["bytes"] == 300 * 100 + (3 << 20) + 4
    if not Path("/dev/full").exists():
        return
    full = ChecksumWriter("/dev/full")
    with pytest.raises(OSError) as info:
        full.write(bytes(2 << 20))
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
    full.write(b"small")  # buffered: the kernel sees it at close
    with pytest.raises(OSError) as info:
        full.close()
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"


def test_without_zlib_ng_the_standard_librarys_crc32_is_used():
    """zlib-ng's CRC32 gives zlib's values (the file CRCs above are compared with zlib's); without the
    package, zlib's own is the checkpoint's."""
    import subprocess
    import sys

    code = (
        "import sys, zlib; sys.modules['zlib_ng'] = None\n"
        "from megatron.checkpoint import files\n"
        "assert files.crc32 is zlib.crc32, files.crc32"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)

"""Sharded checkpoints in one process: exact round trips, async saves, keep-last-k, bad input (each named;
none partially loaded but corrupt data, which the load finds as it reads it into place), fallback to
the newest complete checkpoint, crash points, the readers tools use.

Multi-rank behaviour (TP/DP/PP layouts, resharding, failures on one rank) is in
tests/distributed/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import (
    Checkpointer,
    CheckpointError,
    find_checkpoints,
    iter_tensors,
    load_full_state,
    read_common,
    tensor_metadata,
    verify_checkpoint,
)
from megatron.checkpoint import single_file as basic
from megatron.checkpoint.files import FAULT_ENV
from megatron.config import OptimizerConfig
from megatron.model import GPTModel
from megatron.parallel.state import ParallelState
from tests.helpers import tiny_model_config

# DCP warns on every one-process call; the module's own filter is reset by pytest's warning capture.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
SEQ = 16
SEED = 99
GLOBAL_BATCH = 4


def build(*, dtype=torch.float32, hidden_size=32, num_layers=2, dropout=0.1, device="cpu"):
    """(state, model, optimizer, scheduler) of a tiny seeded model in one process."""
    from megatron.training.optimizer import build_optimizer
    from megatron.training.schedule import build_scheduler

    state = ParallelState.single(device)
    state.seed(SEED)
    config = tiny_model_config(
        num_layers=num_layers,
        hidden_size=hidden_size,
        attention_head_type="multihead",
        seq_length=SEQ,
        dropout=dropout,
    )
    model = GPTModel(config, VOCAB, state)
    model.init_weights(SEED)
    model = model.to(device=device, dtype=dtype)
    optimizer_config = OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, lr_decay_style="cosine")
    optimizer = build_optimizer(model, optimizer_config, parallel_state=state)
    scheduler = build_scheduler(
        optimizer, optimizer_config, train_iters=10, train_samples=None, global_batch_size=GLOBAL_BATCH
    )
    return state, model, optimizer, scheduler


def batches(iteration: int, device="cpu") -> list[dict]:
    generator = torch.Generator().manual_seed(SEED + iteration)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator).to(device)
    return [
        {
            "tokens": tokens[i : i + 2, :-1],
            "labels": tokens[i : i + 2, 1:],
            "loss_mask": tokens.new_ones(2, SEQ).float(),
        }
        for i in (0, 2)
    ]


def train(state, model, optimizer, scheduler, iterations) -> list[float]:
    from megatron.training.step import train_step

    losses = []
    for iteration in iterations:
        losses.append(train_step(model, optimizer, batches(iteration, state.device), state).lm_loss)
        scheduler.step(GLOBAL_BATCH)
    return losses


def weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def save(checkpointer, root, iteration, model, optimizer, scheduler=None, scaler=None, **kwargs):
    kwargs.setdefault("consumed_samples", iteration * GLOBAL_BATCH)
    kwargs.setdefault("config", {"model": {"hidden_size": 32}})
    return checkpointer.save(root, iteration, model, optimizer, scheduler, scaler, **kwargs)


@pytest.fixture
def trained(tmp_path):
    """A model trained 2 steps and saved at iteration 2 under tmp_path/ckpt."""
    state, model, optimizer, scheduler = build()
    train(state, model, optimizer, scheduler, range(2))
    root = tmp_path / "ckpt"
    save(Checkpointer(state), root, 2, model, optimizer, scheduler)
    return root, weights(model)


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_continues_bit_identically(tmp_path, dtype):
    from megatron.training.grad_scaler import build_grad_scaler

    state, model, optimizer, scheduler = build(dtype=dtype)
    scaler = build_grad_scaler(OptimizerConfig(), fp16=True)  # only its state travels here
    scaler.update(True)
    checkpointer = Checkpointer(state)
    train(state, model, optimizer, scheduler, range(3))
    directory = save(
        checkpointer, tmp_path, 3, model, optimizer, scheduler, scaler, extra={"skipped_iterations": 1}
    )
    assert directory == tmp_path / "iter_0000003"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    reference = train(state, model, optimizer, scheduler, range(3, 6))
    reference_weights = weights(model)

    state, model, optimizer, scheduler = build(dtype=dtype)
    fresh_scaler = build_grad_scaler(OptimizerConfig(), fp16=True)
    loaded = Checkpointer(state).load(tmp_path, model, optimizer, scheduler, fresh_scaler)
    assert (loaded.iteration, loaded.consumed_samples, loaded.directory) == (3, 12, directory)
    assert loaded.extra == {"skipped_iterations": 1}
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert train(state, model, optimizer, scheduler, range(3, 6)) == reference  # dropout on: RNG restored
    assert_same(weights(model), reference_weights)


def test_checkpoint_contents(trained):
    root, _ = trained
    directory = root / "iter_0000002"
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    assert names == [".metadata", "__0_0.distcp", "common.json", "manifest.json", "rng/rank_00000.json"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "megatron-starcoder-dcp/1"
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"]
    assert all(len(entry["crc32"]) == 8 for entry in manifest["files"].values())
    common = read_common(directory)
    assert (common["iteration"], common["consumed_samples"]) == (2, 8)
    assert common["config"] == {"model": {"hidden_size": 32}}
    assert common["scheduler"]["num_steps"] == 8 and common["grad_scaler"] is None
    assert common["layout"] == {
        "world": 1,
        "tp": 1,
        "pp": 1,
        "dp": 1,
        "sequence_parallel": False,
        "distributed_optimizer": False,
    }
    keys = tensor_metadata(directory, prefix="")
    assert keys["optimizer/step"] == ((), torch.float32)
    assert keys["rng/rank_00000/torch"][1] == torch.uint8 and "rng/rank_00000/tracker_cpu" in keys
    assert not any(key.startswith("optimizer/master/") for key in keys)  # fp32: no masters
    verify_checkpoint(directory)


def test_readers_give_full_tensors_one_at_a_time(trained):
    root, saved = trained
    directory = root / "iter_0000002"
    full = load_full_state(directory)
    assert_same(full, saved)
    assert_same(dict(iter_tensors(directory)), saved)
    assert {name: meta[0] for name, meta in tensor_metadata(directory).items()} == {
        name: tuple(t.shape) for name, t in saved.items()
    }
    moments = load_full_state(directory, prefix="optimizer/exp_avg/")
    assert set(moments) == set(saved) and all(m.dtype == torch.float32 for m in moments.values())


def test_finetune_no_load_optim_and_no_load_rng(trained):
    root, saved = trained
    state, model, optimizer, scheduler = build()
    loaded = Checkpointer(state).load(root, model, optimizer, scheduler, None, finetune=True)
    assert (loaded.iteration, loaded.consumed_samples) == (0, 0)
    assert_same(weights(model), saved)
    assert not optimizer.optimizer.state and scheduler.num_steps == 0

    state, model, optimizer, scheduler = build()
    rng_before = torch.get_rng_state()
    loaded = Checkpointer(state).load(
        root, model, optimizer, scheduler, None, load_optim=False, load_rng=False
    )
    assert loaded.iteration == 2
    assert_same(weights(model), saved)
    assert not optimizer.optimizer.state and scheduler.num_steps == 0
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_basic_checkpoints_still_load(tmp_path):
    state, model, optimizer, scheduler = build()
    train(state, model, optimizer, scheduler, range(1))
    basic.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, None, 4, {})
    saved = weights(model)
    state, model, optimizer, scheduler = build()
    loaded = Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None)
    assert loaded.iteration == 1
    assert_same(weights(model), saved)


# --------------------------------------------------------------------------- async, keep-last-k


def test_async_save_equals_sync_save_and_training_may_continue(tmp_path):
    state, model, optimizer, scheduler = build()
    train(state, model, optimizer, scheduler, range(2))
    saved = weights(model)
    save(Checkpointer(state), tmp_path / "sync", 2, model, optimizer, scheduler)
    checkpointer = Checkpointer(state, async_save=True)
    assert (
        save(checkpointer, tmp_path / "async", 2, model, optimizer, scheduler)
        == tmp_path / "async/iter_0000002"
    )
    train(state, model, optimizer, scheduler, range(2, 3))  # changes the model while the write runs
    assert checkpointer.wait() == tmp_path / "async" / "iter_0000002"
    assert checkpointer.wait() is None
    sync_dir, async_dir = tmp_path / "sync" / "iter_0000002", tmp_path / "async" / "iter_0000002"
    verify_checkpoint(async_dir)
    assert_same(load_full_state(async_dir), saved)
    assert_same(load_full_state(async_dir, prefix=""), load_full_state(sync_dir, prefix=""))
    assert read_common(async_dir) == read_common(sync_dir)
    assert (async_dir / "rng/rank_00000.json").read_text() == (sync_dir / "rng/rank_00000.json").read_text()


def test_async_save_copies_after_returning_and_fences_the_next_step(tmp_path, monkeypatch):
    """The save call copies nothing: the writer copies once the next forward has begun, slowly, and the
    optimizer step after the save waits for that copy (counted in fence_seconds), so the checkpoint
    holds the weights of the save call, not those of the step that ran meanwhile."""
    import threading
    import time

    from megatron.checkpoint import snapshot

    state, model, optimizer, scheduler = build()
    train(state, model, optimizer, scheduler, range(2))
    saved = weights(model)
    forward_began = threading.Event()
    model.register_forward_pre_hook(lambda *args: forward_began.set())
    original = snapshot.Snapshot.copy_cpu

    def late_slow_copy(self):
        forward_began.wait(timeout=60)
        time.sleep(0.5)
        original(self)

    monkeypatch.setattr(snapshot.Snapshot, "copy_cpu", late_slow_copy)
    checkpointer = Checkpointer(state, async_save=True)
    save(checkpointer, tmp_path, 2, model, optimizer, scheduler)
    train(state, model, optimizer, scheduler, range(2, 3))
    assert checkpointer.fence_seconds > 0.2
    checkpointer.wait()
    assert_same(load_full_state(tmp_path / "iter_0000002"), saved)
    assert not any(torch.equal(weights(model)[name], saved[name]) for name in saved if "weight" in name)
    save(checkpointer, tmp_path, 3, model, optimizer, scheduler)  # the fence is gone after the first step
    train(state, model, optimizer, scheduler, range(3, 4))
    checkpointer.wait()


def test_failing_background_write_is_raised_by_wait(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    state, model, optimizer, scheduler = build()
    checkpointer = Checkpointer(state, async_save=True)
    save(checkpointer, tmp_path, 1, model, optimizer)
    checkpointer.wait()

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(dcp.FileSystemWriter, "write_data", full_disk)
        save(checkpointer, tmp_path, 2, model, optimizer)
        with pytest.raises(CheckpointError) as info:
            checkpointer.wait()
    message = str(info.value)
    assert "background save" in message and str(tmp_path / "iter_0000002") in message
    assert "No space left on device" in message
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    save(checkpointer, tmp_path, 2, model, optimizer)  # the checkpointer still works afterwards
    assert checkpointer.wait() == tmp_path / "iter_0000002"


def test_keep_last_k_and_leftovers(tmp_path):
    state, model, optimizer, _ = build()
    checkpointer = Checkpointer(state, keep_last_k=2)
    leftover = tmp_path / ".iter_0000009.tmp-0badc0de"
    (leftover / "rng").mkdir(parents=True)
    for iteration in (1, 2, 3, 4):
        save(checkpointer, tmp_path, iteration, model, optimizer)
    assert [it for it, _ in find_checkpoints(tmp_path)] == [4, 3]
    assert not leftover.exists()
    save(checkpointer, tmp_path, 4, model, optimizer)  # saving an iteration again replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003",
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]


def test_invalid_settings(monkeypatch):
    state = ParallelState.single("cpu")
    with pytest.raises(ValueError, match="--keep-last-k must be at least 1"):
        Checkpointer(state, keep_last_k=0)
    monkeypatch.setenv(FAULT_ENV, "sometime")
    with pytest.raises(ValueError, match="before_rename, before_tracker"):
        Checkpointer(state)


# --------------------------------------------------------------------------- bad input


def _corrupt(directory: Path, how: str) -> str:
    """Damage one file the way `how` says; returns the text the error must contain."""
    shard = directory / "__0_0.distcp"
    if how == "missing shard":
        shard.unlink()
        return f"{shard}: missing"
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
        return f"{shard}: {shard.stat().st_size} bytes"
    if how == "bit-flipped shard":
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
        return f"{shard}: CRC32 hash differs"
    if how == "missing .metadata":
        (directory / ".metadata").unlink()
        return f"{directory / '.metadata'}: missing"
    if how == "missing manifest":
        (directory / "manifest.json").unlink()
        return f"{directory / 'manifest.json'}: missing"
    raise AssertionError(how)


BAD_INPUTS = [
    "missing shard",
    "truncated shard",
    "bit-flipped shard",
    "missing .metadata",
    "missing manifest",
]


@pytest.mark.parametrize("how", BAD_INPUTS)
def test_bad_checkpoint_is_named_and_nothing_is_loaded(trained, how):
    root, _ = trained
    expected = _corrupt(root / "iter_0000002", how)
    with pytest.raises(ValueError) as info:
        verify_checkpoint(root / "iter_0000002")
    assert expected in str(info.value)
    state, model, optimizer, scheduler = build()
    fresh = weights(model)
    with pytest.raises(ValueError) as info:
        Checkpointer(state).load(root, model, optimizer, scheduler, None)
    assert expected in str(info.value) and "no usable checkpoint" in str(info.value)
    if how != "bit-flipped shard":  # found before any data is read
        assert_same(weights(model), fresh)
    # else the CRC32 of the bytes read into the parameters is known only once they are there: the load
    # fails (the run stops) or falls back to a complete checkpoint, which overwrites them all
    # (test_checkpoint_streams.py)
    assert not optimizer.optimizer.state and scheduler.num_steps == 0


def test_fallback_to_the_newest_complete_checkpoint(tmp_path, capsys):
    state, model, optimizer, scheduler = build()
    checkpointer = Checkpointer(state)
    expected = {}
    for iteration in (1, 2, 3):
        train(state, model, optimizer, scheduler, [iteration])
        save(checkpointer, tmp_path, iteration, model, optimizer, scheduler)
        expected[iteration] = weights(model)
    _corrupt(tmp_path / "iter_0000003", "bit-flipped shard")
    _corrupt(tmp_path / "iter_0000002", "missing manifest")
    state, model, optimizer, scheduler = build()
    capsys.readouterr()
    loaded = Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None)
    assert loaded.iteration == 1
    assert_same(weights(model), expected[1])
    log = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'iter_0000003'}" in log and "CRC32 hash differs" in log
    assert f"loading {tmp_path / 'iter_0000001'}, the newest complete checkpoint" in log


def test_tracker_pointing_at_nothing(trained):
    root, _ = trained
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    (root / "iter_0000002" / "manifest.json").unlink()
    state, model, optimizer, scheduler = build()
    with pytest.raises(ValueError) as info:
        Checkpointer(state).load(root, model, optimizer, scheduler, None)
    message = str(info.value)
    assert "latest_checkpointed_iteration.txt names iter_0000007" in message
    assert f"{root / 'iter_0000007'}: does not exist" in message


def test_no_tracker_means_no_checkpoint(tmp_path):
    state, model, optimizer, scheduler = build()
    assert Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None) is None


@pytest.mark.parametrize(
    "other, expected",
    [
        (
            dict(hidden_size=64),
            "\n  model/embedding.word_embeddings.weight: checkpoint [128, 32], model [128, 64]",
        ),
        (dict(num_layers=1), "12 unexpected; likely --num-layers (checkpoint 2, model 1)"),
        (dict(num_layers=3), "model/layers.2.attention.dense.bias: missing from the checkpoint (model [32])"),
    ],
    ids=["wider", "shallower", "deeper"],
)
def test_checkpoint_of_another_model_shape_is_refused_before_loading(trained, other, expected):
    root, _ = trained
    state, model, optimizer, scheduler = build(**other)
    fresh = weights(model)
    with pytest.raises(ValueError) as info:
        Checkpointer(state).load(root, model, optimizer, scheduler, None)
    assert expected in str(info.value) and str(root / "iter_0000002") in str(info.value)
    assert_same(weights(model), fresh)


def test_metadata_is_never_unpickled_freely(trained, tmp_path):
    root, _ = trained
    directory = root / "iter_0000002"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (directory / ".metadata").write_bytes(pickle.dumps(Exploit()))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][".metadata"] = manifest_entry(directory / ".metadata")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    state, model, optimizer, scheduler = build()
    with pytest.raises(ValueError, match="is not allowed in checkpoint metadata"):
        Checkpointer(state).load(root, model, optimizer, scheduler, None)
    with pytest.raises(ValueError, match="is not allowed"):
        load_full_state(directory)
    assert not marker.exists()


def manifest_entry(path: Path) -> dict:
    from megatron.checkpoint.files import file_entry as _file_entry

    return _file_entry(path)


def test_data_files_are_checksummed_while_written_and_while_read(tmp_path, monkeypatch):
    """The save hashes no data file by reading it back, the load none beyond what it reads anyway; a
    bit flip in tensor data (which DCP itself would load silently) is named at load."""
    import megatron.checkpoint.checkpointer as checkpointer_module
    import megatron.checkpoint.files as files

    hashed, original = [], files.file_entry

    def file_entry(path, *args):
        hashed.append(Path(path).name)
        return original(path, *args)

    monkeypatch.setattr(files, "file_entry", file_entry)
    monkeypatch.setattr(checkpointer_module, "file_entry", file_entry)
    state, model, optimizer, scheduler = build()
    train(state, model, optimizer, scheduler, range(1))
    save(Checkpointer(state), tmp_path, 1, model, optimizer, scheduler)
    saved = weights(model)
    assert hashed and not [name for name in hashed if name.endswith(".distcp")]
    hashed.clear()
    state, model, optimizer, scheduler = build()
    Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None)
    assert_same(weights(model), saved)
    assert hashed and not [name for name in hashed if name.endswith(".distcp")]
    shard = tmp_path / "iter_0000001" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) - 4096] ^= 0x01  # inside the last tensor's data: no zip header notices
    shard.write_bytes(bytes(data))
    state, model, optimizer, scheduler = build()
    fresh = weights(model)
    with pytest.raises(ValueError, match=f"{shard}: CRC32 hash differs"):
        Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None)
    assert_same(weights(model), fresh)


def test_checkpoints_hashed_with_blake2b_still_verify_and_load(trained):
    """Manifests written before CRC32 record BLAKE2b hashes: still checked, corruption still named."""
    import hashlib

    root, saved = trained
    directory = root / "iter_0000002"
    manifest = json.loads((directory / "manifest.json").read_text())
    for relative, entry in manifest["files"].items():
        entry.pop("crc32")
        entry["blake2b"] = hashlib.blake2b((directory / relative).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(directory)
    state, model, optimizer, scheduler = build()
    Checkpointer(state).load(root, model, optimizer, scheduler, None)
    assert_same(weights(model), saved)
    expected = _corrupt(directory, "bit-flipped shard").replace("CRC32", "BLAKE2b")
    with pytest.raises(ValueError, match=expected):
        Checkpointer(state).load(root, model, optimizer, scheduler, None)


# --------------------------------------------------------------------------- crash points

_CRASHING_SAVE = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_checkpoint_sharded import build, save
from megatron.checkpoint import Checkpointer
state, model, optimizer, scheduler = build()
checkpointer = Checkpointer(state)
save(checkpointer, {root!r}, 1, model, optimizer)
with torch.no_grad():
    for param in model.parameters():
        param.add_(1.0)
os.environ["MEGATRON_CHECKPOINT_FAULT"] = {point!r}
save(checkpointer, {root!r}, 2, model, optimizer)
print("not killed")
"""


@pytest.mark.parametrize("point", ["before_rename", "before_tracker"])
def test_a_save_killed_at_its_worst_moments_leaves_the_previous_checkpoint(tmp_path, point):
    root = tmp_path / "ckpt"
    script = _CRASHING_SAVE.format(
        repo=str(REPO_ROOT), tests=str(Path(__file__).parent), root=str(root), point=point
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True
    )
    assert done.returncode == -9, done.stdout + done.stderr
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    if point == "before_rename":
        assert [it for it, _ in find_checkpoints(root)] == [1]
        assert any(p.name.startswith(".iter_0000002.tmp-") for p in root.iterdir())
    else:
        verify_checkpoint(root / "iter_0000002")  # complete, but the tracker was never moved to it
    saved_at_1 = load_full_state(root / "iter_0000001")
    state, model, optimizer, scheduler = build()
    loaded = Checkpointer(state).load(root, model, optimizer, scheduler, None)
    assert loaded.iteration == 1
    assert_same(weights(model), saved_at_1)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_cuda_state_is_restored_exactly(tmp_path, async_save):
    """bf16 on CUDA with fused AdamW (its step lives on the GPU) and dropout (CUDA generator and the
    tracker's CUDA stream). Whole continued runs are not compared bit for bit: CUDA's embedding backward
    sums with atomics, so two uninterrupted runs differ too. The restored state is compared exactly, and
    so is the next forward's loss, whose dropout masks come from the restored CUDA generators."""
    state, model, optimizer, scheduler = build(dtype=torch.bfloat16, device="cuda")
    train(state, model, optimizer, scheduler, range(2))
    checkpointer = Checkpointer(state, async_save=async_save)
    save(checkpointer, tmp_path, 2, model, optimizer, scheduler)
    saved_weights, saved_rng = weights(model), torch.cuda.get_rng_state()
    saved_adam = {
        id(main): {k: v.clone() for k, v in optimizer.optimizer.state[main].items()}
        for main in optimizer.main_params
    }
    saved_masters = [main.detach().clone() for main in optimizer.main_params]
    reference = train(state, model, optimizer, scheduler, [2])[0]
    checkpointer.wait()

    state, model, optimizer, scheduler = build(dtype=torch.bfloat16, device="cuda")
    Checkpointer(state).load(tmp_path, model, optimizer, scheduler, None)
    assert_same(weights(model), saved_weights)
    assert torch.equal(torch.cuda.get_rng_state(), saved_rng)
    for main, old_main, master in zip(optimizer.main_params, saved_adam, saved_masters, strict=True):
        assert torch.equal(main.detach(), master)
        restored, original = optimizer.optimizer.state[main], saved_adam[old_main]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert restored[key].device == original[key].device and restored[key].dtype == original[key].dtype
            assert torch.equal(restored[key], original[key]), key
    assert train(state, model, optimizer, scheduler, [2])[0] == reference

"""DP-replicated tensors (model weights; optimizer state without the distributed optimizer) are read once
per data-parallel group at load and exchanged over it (megatron/checkpoint/replicated.py), on the strict
backend (NCCL's rules checked).

One spawn of 4 ranks runs every scenario; the tests then compare what each rank read
(`CHECKPOINT_BYTES`) and sent over DP (`COMM_BYTES`) with what the checkpoint's metadata says:
- DP 4 (distributed optimizer, bf16): each rank reads the model tensors DCP wrote into its own data file,
  about 1/DP of the model, the job the checkpoint's model bytes once; every data file is checksummed as
  it is read (none hashed afterwards); the model is bit-identical to what was saved, also with the
  exchange cut into small pieces; a corrupted model data file is named and the model left untouched.
- TP 2 x DP 2 (fp32, no distributed optimizer: the optimizer state is replicated too): the same, where the
  tensors replicated over TP (saved once, in one TP position's files) are split across the other TP
  position's DP group.
- That checkpoint loaded at DP 4 (resharding: no saved chunk is a rank's tensor): every tensor split
  evenly and all-gathered; exact.

The expected bytes follow from the rule, computed from the metadata: a tensor whose TP-local chunk a DP
peer's own file holds is read whole by that peer and broadcast ((DP-1)/DP of its bytes per rank); the
rest of one dtype is laid end to end, padded to a multiple of DP, each rank reading its 1/DP and the
group all-gathering it ((DP-1)/DP of the padded bytes per rank).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from megatron.config import OptimizerConfig, ParallelConfig
from megatron.model import build_model
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.slow

VOCAB, SEQ, MICRO_BATCH, SEED = 128, 16, 2, 1234


def _build(state: ParallelState, *, distributed_optimizer: bool, dtype):
    from megatron.training.optimizer import build_optimizer

    state.seed(SEED)
    parallel = ParallelConfig(
        tensor_model_parallel_size=state.tensor_model_parallel_size,
        use_distributed_optimizer=distributed_optimizer,
        ddp_bucket_size=3000,
    )
    model = build_model(tiny_model_config(hidden_size=32, seq_length=SEQ), VOCAB, state, parallel)
    model.init_weights(SEED)
    model = model.to(dtype=dtype)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    return model, build_optimizer(model, config, parallel_state=state, parallel_config=parallel)


def _train_step(model, optimizer, state: ParallelState) -> None:
    from megatron.training.step import train_step

    generator = torch.Generator().manual_seed(SEED + state.data_parallel_rank)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)}
    train_step(model, optimizer, [batch], state)


def _snapshot(model, optimizer) -> list[torch.Tensor]:
    """Every weight, master and moment of this rank, in a fixed order."""
    out = [param.detach().clone() for param in model.parameters()]
    for _, _, main in optimizer.main_param_pieces():
        adam = optimizer.optimizer.state.get(main, {})
        out += [main.detach().clone()] + [adam[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in adam]
    return out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _replicated_keys(model, optimizer, state: ParallelState) -> list[tuple]:
    """(key, logical offsets of this rank's TP-local chunk, its shape, bytes per element, split over TP)
    of every key this rank loads whole: the model's, and the optimizer's without the distributed
    optimizer."""
    from megatron.checkpoint.fragments import block_offsets

    kinds = [] if optimizer.sharded_over_data_parallel else ["exp_avg", "exp_avg_sq"]
    out = []
    for name, param in model.named_parameters():
        offsets = block_offsets(param, state.tensor_model_parallel_rank)
        split = bool(getattr(param, "tensor_model_parallel", False))
        out.append((f"model/{name}", offsets, tuple(param.shape), param.element_size(), split))
        out += [(f"optimizer/{kind}/{name}", offsets, tuple(param.shape), 4, split) for kind in kinds]
    return out


def _load(checkpointer, directory: Path, model, optimizer, state: ParallelState) -> dict:
    """Load, counting bytes read and sent over DP, and the data files hashed after the read."""
    from megatron.checkpoint import verify
    from megatron.checkpoint.fragments import CHECKPOINT_BYTES
    from megatron.parallel.collectives import COMM_BYTES

    hashed, problems_of = [], verify.problems_of

    def recording(checks, progress=None):
        hashed.extend(path.name for path, _, checksum in checks if checksum and path.suffix == ".distcp")
        return problems_of(checks, progress)

    CHECKPOINT_BYTES.reset()
    COMM_BYTES.reset()
    verify.problems_of = recording
    try:
        checkpointer.load(directory, model, optimizer, None, None)
    finally:
        verify.problems_of = problems_of
    dp = {op: count for (kind, op), count in COMM_BYTES.by_op().items() if kind == "dp"}
    return {"read": dict(CHECKPOINT_BYTES.read), "dp": dp, "hashed_after": hashed}


def _dp4(root: Path) -> dict:
    """DP 4, distributed optimizer, bf16: save, load (whole exchange, then in 64-byte pieces), and a
    corrupted model data file."""
    from megatron.checkpoint import Checkpointer, replicated

    state = ParallelState.initialize(1, 1, backend="strict")
    model, optimizer = _build(state, distributed_optimizer=True, dtype=torch.bfloat16)
    _train_step(model, optimizer, state)
    checkpointer = Checkpointer(state)
    checkpointer.save(root / "dp4", 1, model, optimizer, None, None, consumed_samples=8, config={})
    saved = _snapshot(model, optimizer)
    result = {"keys": _replicated_keys(model, optimizer, state), "tp": 0, "dp_ranks": state.dp_group.ranks}
    result["backend"] = state.backend
    model, optimizer = _build(state, distributed_optimizer=True, dtype=torch.bfloat16)
    result["load"] = _load(checkpointer, root / "dp4", model, optimizer, state)
    result["equal"] = _equal(_snapshot(model, optimizer), saved)
    model, optimizer = _build(state, distributed_optimizer=True, dtype=torch.bfloat16)
    replicated.CPU_CHUNK_BYTES = 64
    try:
        result["pieces"] = _load(checkpointer, root / "dp4", model, optimizer, state)
    finally:
        replicated.CPU_CHUNK_BYTES = None
    result["pieces_equal"] = _equal(_snapshot(model, optimizer), saved)
    result["corrupt"] = _corrupt(root / "corrupt", state)
    return result


def _corrupt(root: Path, state: ParallelState) -> dict:
    """One checkpoint whose rank 1 file has a flipped bit inside its largest model tensor's bytes: the
    load fails naming that file, and the model keeps its weights."""
    from megatron.checkpoint import Checkpointer, read_metadata

    model, optimizer = _build(state, distributed_optimizer=True, dtype=torch.bfloat16)
    checkpointer = Checkpointer(state)
    checkpointer.save(root, 1, model, optimizer, None, None, consumed_samples=8, config={})
    state.barrier()
    if state.rank == 0:
        metadata = read_metadata(root / "iter_0000001")
        params = dict(model.named_parameters())
        index, info = max(
            (
                (index, info)
                for index, info in metadata.storage_data.items()
                if info.relative_path == "__1_0.distcp" and index.fqn.startswith("model/")
            ),
            key=lambda pair: pair[1].length,
        )
        path = root / "iter_0000001" / info.relative_path
        data = bytearray(path.read_bytes())
        payload = (
            params[index.fqn.removeprefix("model/")].detach().contiguous().view(torch.uint8).numpy().tobytes()
        )
        at = data.find(payload, info.offset, info.offset + info.length)
        assert at >= 0, index.fqn
        data[at + len(payload) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    state.barrier()
    model, optimizer = _build(state, distributed_optimizer=True, dtype=torch.bfloat16)
    before = _snapshot(model, optimizer)
    try:
        checkpointer.load(root, model, optimizer, None, None)
        message = None
    except ValueError as exc:
        message = str(exc)
    return {"message": message, "untouched": _equal(_snapshot(model, optimizer), before)}


def _tp2dp2(root: Path) -> dict:
    """TP 2 x DP 2, fp32, no distributed optimizer: save, load."""
    from megatron.checkpoint import Checkpointer
    from megatron.parallel.layers import full_state_dict

    state = ParallelState.initialize(2, 1, backend="strict")
    model, optimizer = _build(state, distributed_optimizer=False, dtype=torch.float32)
    _train_step(model, optimizer, state)
    checkpointer = Checkpointer(state)
    checkpointer.save(root, 1, model, optimizer, None, None, consumed_samples=8, config={})
    saved = _snapshot(model, optimizer)
    result = {
        "keys": _replicated_keys(model, optimizer, state),
        "tp": state.tensor_model_parallel_rank,
        "dp_ranks": state.dp_group.ranks,
        "full": full_state_dict(model, state),
    }
    model, optimizer = _build(state, distributed_optimizer=False, dtype=torch.float32)
    result["load"] = _load(checkpointer, root, model, optimizer, state)
    result["equal"] = _equal(_snapshot(model, optimizer), saved)
    return result


def _resharded(root: Path) -> dict:
    """The TP 2 x DP 2 checkpoint at DP 4."""
    from megatron.checkpoint import Checkpointer

    state = ParallelState.initialize(1, 1, backend="strict")
    model, optimizer = _build(state, distributed_optimizer=False, dtype=torch.float32)
    result = {"keys": _replicated_keys(model, optimizer, state), "tp": 0, "dp_ranks": state.dp_group.ranks}
    result["load"] = _load(Checkpointer(state), root, model, optimizer, state)
    result["weights"] = {name: param.detach().clone() for name, param in model.named_parameters()}
    return result


def _from_one_process(root: Path) -> dict:
    """Rank 0 alone saves (one data file holds everything); DP 4 loads it."""
    from megatron.checkpoint import Checkpointer

    if int(torch.distributed.get_rank()) == 0:
        single = ParallelState.single("cpu")
        model, optimizer = _build(single, distributed_optimizer=False, dtype=torch.float32)
        _train_step(model, optimizer, single)
        Checkpointer(single).save(root, 1, model, optimizer, None, None, consumed_samples=8, config={})
    state = ParallelState.initialize(1, 1, backend="strict")
    state.barrier()
    weights = [param.detach().clone() for param in model.parameters()] if state.rank == 0 else None
    model, optimizer = _build(state, distributed_optimizer=False, dtype=torch.float32)
    result = {"keys": _replicated_keys(model, optimizer, state), "tp": 0, "dp_ranks": state.dp_group.ranks}
    result["load"] = _load(Checkpointer(state), root, model, optimizer, state)
    result["weights"] = [param.detach().clone() for param in model.parameters()]
    result["saved"] = weights
    return result


def _every_scenario(root: str) -> dict:
    root = Path(root)
    return {
        "dp4": _dp4(root),
        "tp2dp2": _tp2dp2(root / "tp2dp2"),
        "resharded": _resharded(root / "tp2dp2"),
        "one-process": _from_one_process(root / "single"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("replicated")
    return run_distributed(_every_scenario, 4, str(root), timeout=300), root


def _owners(metadata, info: dict) -> dict[str, int | None]:
    """Key -> the rank of this rank's DP group whose own data file holds its TP-local chunk exactly, or
    None; all None when one rank would read more than 1/DP of the bytes plus the largest tensor."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    owners, per_owner, nbytes = {}, dict.fromkeys(info["dp_ranks"], 0), {}
    for key, offsets, shape, itemsize, _ in info["keys"]:
        nbytes[key] = math.prod(shape) * itemsize
        chunks = metadata.state_dict_metadata[key].chunks
        exact = any(tuple(c.offsets) == offsets and tuple(c.sizes) == shape for c in chunks)
        stored = metadata.storage_data.get(MetadataIndex(key, offsets)) if exact else None
        owner = re.match(r"__(\d+)_", stored.relative_path) if stored is not None else None
        owners[key] = int(owner.group(1)) if owner and int(owner.group(1)) in per_owner else None
        if owners[key] is not None:
            per_owner[owners[key]] += nbytes[key]
    if max(per_owner.values()) > sum(nbytes.values()) / len(per_owner) + max(nbytes.values()):
        return dict.fromkeys(owners)
    return owners


def _expected(directory: Path, per_rank: list[dict]) -> tuple[list[int], list[Fraction], int]:
    """From the checkpoint's metadata and the rule in the module docstring: each rank's bytes read of
    its replicated keys, its bytes sent over DP, and the checkpoint's bytes of those keys."""
    from megatron.checkpoint import read_metadata

    metadata = read_metadata(directory)
    reads, sent = [0] * len(per_rank), [Fraction(0)] * len(per_rank)
    for rank, info in enumerate(per_rank):
        ranks, size = info["dp_ranks"], len(info["dp_ranks"])
        owners = _owners(metadata, info)
        whole, split, itemsize = 0, 0, None
        for key, _, shape, itemsize, _ in info["keys"]:
            if owners[key] is not None:
                whole += math.prod(shape) * itemsize
                reads[rank] += math.prod(shape) * itemsize if owners[key] == rank else 0
            else:
                split += math.prod(shape)
        share = math.ceil(split / size)
        index = ranks.index(rank)
        reads[rank] += max(0, min(share, split - index * share)) * itemsize
        sent[rank] = Fraction(size - 1, size) * (whole + share * size * itemsize)
    keys = {key for info in per_rank for key, *_ in info["keys"]}
    total = sum(
        math.prod(chunk.sizes) * metadata.state_dict_metadata[key].properties.dtype.itemsize
        for key in keys
        for chunk in metadata.state_dict_metadata[key].chunks
    )
    return reads, sent, total


def _read(load: dict) -> int:
    """Bytes read of the replicated keys: the model's and the optimizer's but its step (4 bytes)."""
    return load["read"].get("model", 0) + load["read"]["optimizer"] - 4


def test_dp4_each_rank_reads_its_own_file_and_the_job_reads_the_model_once(results):
    per_rank, root = results
    runs = [r["dp4"] for r in per_rank]
    reads, sent, total = _expected(root / "dp4" / "iter_0000001", runs)
    model_bytes = sum(math.prod(shape) * itemsize for _, _, shape, itemsize, _ in runs[0]["keys"])
    largest = max(math.prod(shape) * itemsize for _, _, shape, itemsize, _ in runs[0]["keys"])
    assert total == model_bytes  # the model keys only (the optimizer's are fragments)
    assert sum(r["load"]["read"]["model"] for r in runs) == model_bytes  # the job reads it once
    for rank, run in enumerate(runs):
        assert run["backend"] == "strict"
        assert run["equal"] and run["pieces_equal"], rank
        assert run["load"]["read"]["model"] == reads[rank], (rank, run["load"]["read"], reads)
        assert run["load"]["read"]["model"] <= model_bytes / 4 + largest < model_bytes  # not all of it
        assert run["load"]["dp"] == {"broadcast": sent[rank]}  # every tensor whole from its reader
        assert sent[rank] == Fraction(3, 4) * model_bytes
        assert run["load"]["hashed_after"] == []  # each file checksummed as its owner read it whole
        assert run["pieces"]["dp"] == run["load"]["dp"] and run["pieces"]["read"] == run["load"]["read"]


def test_corrupt_model_file_is_named_and_the_model_untouched(results):
    per_rank, _ = results
    for run in (r["dp4"]["corrupt"] for r in per_rank):
        assert run["untouched"]
        assert run["message"] is not None and "__1_0.distcp: CRC32 hash differs" in run["message"]


def test_tp2_dp2_reads_replicated_model_and_optimizer_once_per_dp_group(results):
    per_rank, root = results
    runs = [r["tp2dp2"] for r in per_rank]
    reads, sent, total = _expected(root / "tp2dp2" / "iter_0000001", runs)
    for rank, run in enumerate(runs):
        assert run["equal"], rank
        assert _read(run["load"]) == reads[rank], (rank, run["load"]["read"], reads)
        assert sum(run["load"]["dp"].values()) == sent[rank], (rank, run["load"]["dp"], sent[rank])
        assert run["load"]["hashed_after"] == []
    # each DP group reads its TP-local tensors once: the checkpoint's bytes, plus the TP-replicated
    # tensors a second time (saved once, needed by both TP positions)
    replicated_over_tp = sum(
        math.prod(shape) * itemsize for _, _, shape, itemsize, split in runs[0]["keys"] if not split
    )
    assert replicated_over_tp > 0
    assert sum(_read(run["load"]) for run in runs) == total + replicated_over_tp
    assert any(run["load"]["dp"].get("all_gather") for run in runs)  # the TP-replicated tensors, split


def test_resharded_load_splits_every_tensor_and_is_exact(results):
    per_rank, root = results
    runs = [r["resharded"] for r in per_rank]
    full = per_rank[0]["tp2dp2"]["full"]
    reads, sent, _ = _expected(root / "tp2dp2" / "iter_0000001", runs)
    local_bytes = sum(math.prod(shape) * itemsize for _, _, shape, itemsize, _ in runs[0]["keys"])
    for rank, run in enumerate(runs):
        assert run["weights"].keys() == full.keys()
        assert all(torch.equal(run["weights"][name], full[name]) for name in full)
        assert _read(run["load"]) == reads[rank], (rank, run["load"]["read"], reads)
        assert sum(run["load"]["dp"].values()) == sent[rank]
        assert "all_gather" in run["load"]["dp"]
    assert sum(_read(run["load"]) for run in runs) == local_bytes  # every element read once


def test_checkpoint_of_one_process_is_split_evenly_not_read_by_its_one_writer(results):
    per_rank, root = results
    runs = [r["one-process"] for r in per_rank]
    reads, sent, _ = _expected(root / "single" / "iter_0000001", runs)
    local_bytes = sum(math.prod(shape) * itemsize for _, _, shape, itemsize, _ in runs[0]["keys"])
    for rank, run in enumerate(runs):
        assert _equal(run["weights"], runs[0]["saved"]), rank
        assert _read(run["load"]) == reads[rank] <= math.ceil(local_bytes / 4 / 4) * 4, (rank, reads)
        assert run["load"]["dp"] == {"all_gather": sent[rank]}
    assert sum(_read(run["load"]) for run in runs) == local_bytes

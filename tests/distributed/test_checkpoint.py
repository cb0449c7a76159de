"""Sharded checkpoints across ranks: exact round trips at TP 2 x DP 2 (with and without the distributed
optimizer, sync and async), resharding TP 2 x PP 2 -> one process and -> DP 4 (distributed optimizer),
the distributed optimizer's own-fragment checkpoints (TP 2 x DP 2 -> DP 4 -> DP 4 and -> one process,
exact, with the bytes each rank stages and reads), and failures that must reach every rank (a
background write failing on one rank, a corrupt shard).

One spawn of 4 gloo ranks runs every scenario (process start-up dominates these tiny runs); the test
functions then check its results. The model is tiny, trained a few steps with dropout on, so the RNG
states, AdamW moments and bf16 masters all matter for exactness.

Tolerance: a round trip at the same layout must be bit-identical (losses and weights). Loading at
another layout restores every tensor (weights, bf16 masters, moments) exactly; only the next step's
summation order changes. The resharding runs compute in bf16 (so that fp32 masters exist), where each
GEMM output is rounded to 8 mantissa bits in a layout-dependent order: the next loss agrees within
BF16_LOSS_RTOL = 1e-3 relative (measured 2.6e-5). The fp32 version of that check, within 1e-5, is the
lead's training-loop acceptance test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megatron.config import OptimizerConfig, ParallelConfig
from megatron.model import build_model
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.helpers import tiny_model_config

VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
GLOBAL_BATCH = 8
SEED = 4321
BF16_LOSS_RTOL = 1e-3


def global_batch(iteration: int) -> list[dict]:
    generator = torch.Generator().manual_seed(SEED + iteration)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    return [
        {
            "tokens": tokens[start : start + MICRO_BATCH, :-1].contiguous(),
            "labels": tokens[start : start + MICRO_BATCH, 1:].contiguous(),
            "loss_mask": torch.ones(MICRO_BATCH, SEQ),
        }
        for start in range(0, GLOBAL_BATCH, MICRO_BATCH)
    ]


def build(state: ParallelState, *, distributed_optimizer: bool = False, dtype=torch.float32, dropout=0.1):
    """Seeded tiny model and optimizer in `state`'s layout (dropout draws from every random stream; the
    resharding runs turn it off, since masks legitimately differ between layouts)."""
    from megatron.training.optimizer import build_optimizer

    state.seed(SEED)
    parallel = ParallelConfig(
        tensor_model_parallel_size=state.tensor_model_parallel_size,
        pipeline_model_parallel_size=state.pipeline_model_parallel_size,
        use_distributed_optimizer=distributed_optimizer,
        ddp_bucket_size=3000,  # several buckets, so fragments cut parameters
    )
    model = build_model(
        tiny_model_config(hidden_size=32, attention_head_type="multihead", seq_length=SEQ, dropout=dropout),
        VOCAB,
        state,
        parallel,
    )
    model.init_weights(SEED)
    model = model.to(dtype=dtype)
    optimizer = build_optimizer(
        model,
        OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0),
        parallel_state=state,
        parallel_config=parallel,
    )
    return model, optimizer


def train(model, optimizer, state: ParallelState, iterations) -> list[float]:
    from megatron.training.step import train_step

    losses = []
    for iteration in iterations:
        batches = global_batch(iteration)[state.data_parallel_rank :: state.data_parallel_size]
        losses.append(train_step(model, optimizer, batches, state).lm_loss)
    return losses


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _round_trip(root: Path, *, distributed_optimizer: bool, dtype, async_save: bool, tp=2, pp=1) -> dict:
    """TP 2 x DP 2 (or `tp` x `pp`): 2 steps, save, 2 steps (reference); fresh build, load, the same 2
    steps."""
    from megatron.checkpoint import Checkpointer

    state = ParallelState.initialize(tp, pp, backend="gloo")
    model, optimizer = build(state, distributed_optimizer=distributed_optimizer, dtype=dtype)
    checkpointer = Checkpointer(state, async_save=async_save)
    train(model, optimizer, state, range(2))
    checkpointer.save(root, 2, model, optimizer, None, None, consumed_samples=16, config={"run": "a"})
    reference = train(model, optimizer, state, range(2, 4))  # runs while an async save writes
    written = checkpointer.wait() if async_save else None
    reference_weights = _weights(model)
    model, optimizer = build(state, distributed_optimizer=distributed_optimizer, dtype=dtype)
    loaded = Checkpointer(state).load(root, model, optimizer, None, None)
    resumed = train(model, optimizer, state, range(2, 4))
    return {
        "loaded_iteration": loaded.iteration,
        "written": written,
        "losses_equal": resumed == reference,
        "weights_equal": _same(_weights(model), reference_weights),
        "losses": (reference, resumed),
    }


def _local_optimizer_state(model, optimizer) -> dict:
    """name -> this rank's exp_avg, exp_avg_sq, master (whole parameters: no distributed optimizer)."""
    out = {}
    for param, offset, main in optimizer.main_param_pieces():
        assert offset == 0
        state = optimizer.optimizer.state[main]
        out[id(param)] = {"exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}
        out[id(param)]["master"] = main.detach().clone()
    named = {}
    for name, param in model.named_parameters():
        if getattr(param, "pipeline_duplicate", False):
            continue
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        named[name] = dict(out[id(param)], dim=dim)
    return named


def _save_tp2_pp2(root: Path) -> dict:
    """TP 2 x PP 2 in bf16: 3 steps, save, then the next loss (the reference for resharded loads)."""
    from megatron.checkpoint import Checkpointer
    from megatron.parallel.layers import full_state_dict

    state = ParallelState.initialize(2, 2, backend="gloo")
    model, optimizer = build(state, dtype=torch.bfloat16, dropout=0.0)
    train(model, optimizer, state, range(3))
    Checkpointer(state).save(root, 3, model, optimizer, None, None, consumed_samples=24, config={})
    result = {
        "weights": full_state_dict(model, state),
        "optimizer": _local_optimizer_state(model, optimizer),
        "tp_rank": state.tensor_model_parallel_rank,
    }
    result["next_loss"] = train(model, optimizer, state, [3])[0]
    return result


def _load_dp4(root: Path) -> dict:
    """DP 4 with the distributed optimizer: load the TP 2 x PP 2 checkpoint; report the fragments."""
    from megatron.checkpoint import Checkpointer

    state = ParallelState.initialize(1, 1, backend="gloo")
    model, optimizer = build(state, distributed_optimizer=True, dtype=torch.bfloat16, dropout=0.0)
    Checkpointer(state).load(root, model, optimizer, None, None)
    names = {id(param): name for name, param in model.named_parameters()}
    fragments = []
    for param, offset, main in optimizer.main_param_pieces():
        adam = optimizer.optimizer.state[main]
        fragments.append(
            (
                names[id(param)],
                offset,
                main.detach().clone(),
                adam["exp_avg"].clone(),
                adam["exp_avg_sq"].clone(),
            )
        )
    steps = {float(adam["step"]) for adam in optimizer.optimizer.state.values()}
    return {
        "weights": _weights(model),
        "fragments": fragments,
        "steps": steps,
        "next_loss": train(model, optimizer, state, [3])[0],
    }


def _fragments(model, optimizer, state: ParallelState) -> list[tuple]:
    """This rank's distributed-optimizer fragments: (name, TP rank, offset, exp_avg, exp_avg_sq, master)."""
    names = {id(param): name for name, param in model.named_parameters()}
    out = []
    for param, offset, main in optimizer.main_param_pieces():
        adam = optimizer.optimizer.state[main]
        tp_rank = state.tensor_model_parallel_rank
        moments = (adam["exp_avg"].clone(), adam["exp_avg_sq"].clone())
        out.append((names[id(param)], tp_rank, offset, *moments, main.detach().clone()))
    return out


def _distopt_shards(root: Path) -> dict:
    """Distributed optimizer in bf16 (masters exist): TP 2 x DP 2 trains 2 steps and saves its own
    fragments; DP 4 loads them (another fragment layout) and saves its own; a fresh DP 4 model loads
    that. Reports the fragments, the bytes staged and read, and what they should be."""
    from megatron.checkpoint import Checkpointer
    from megatron.checkpoint.fragments import CHECKPOINT_BYTES

    state = ParallelState.initialize(2, 1, backend="gloo")
    model, optimizer = build(state, distributed_optimizer=True, dtype=torch.bfloat16, dropout=0.0)
    train(model, optimizer, state, range(2))
    Checkpointer(state).save(root / "tp2dp2", 2, model, optimizer, None, None, consumed_samples=16, config={})
    result = {"tp2dp2": _fragments(model, optimizer, state)}
    result["layout"] = {  # name -> (TP-local shape, partition dim or None)
        name: (
            tuple(param.shape),
            param.partition_dim if getattr(param, "tensor_model_parallel", False) else None,
        )
        for name, param in model.named_parameters()
    }
    state = ParallelState.initialize(1, 1, backend="gloo")
    model, optimizer = build(state, distributed_optimizer=True, dtype=torch.bfloat16, dropout=0.0)
    checkpointer = Checkpointer(state)
    checkpointer.load(root / "tp2dp2", model, optimizer, None, None)
    result["dp4"] = _fragments(model, optimizer, state)
    CHECKPOINT_BYTES.reset()
    checkpointer.save(root / "dp4", 2, model, optimizer, None, None, consumed_samples=16, config={})
    result["staged"] = dict(CHECKPOINT_BYTES.staged)
    model, optimizer = build(state, distributed_optimizer=True, dtype=torch.bfloat16, dropout=0.0)
    CHECKPOINT_BYTES.reset()
    checkpointer.load(root / "dp4", model, optimizer, None, None)
    result["read"] = dict(CHECKPOINT_BYTES.read)
    result["dp4-reloaded"] = _fragments(model, optimizer, state)
    elements = sum(param.numel() for param in model.parameters())
    result["own_elements"] = sum(main.numel() for _, _, main in optimizer.main_param_pieces())
    result["elements"] = elements
    result["padding"] = optimizer.grad_buffer.data.numel() - elements  # each bucket padded to a DP multiple
    result["model_bytes"] = sum(param.numel() * param.element_size() for param in model.parameters())
    return result


def _failing_background_write(root: Path) -> dict:
    """Rank 1's shard write fails during an async save: every rank's wait() must raise."""
    import torch.distributed.checkpoint as dcp

    from megatron.checkpoint import Checkpointer, CheckpointError

    state = ParallelState.initialize(2, 1, backend="gloo")
    model, optimizer = build(state)
    checkpointer = Checkpointer(state, async_save=True)
    checkpointer.save(root, 1, model, optimizer, None, None, consumed_samples=0, config={})
    checkpointer.wait()
    original = dcp.FileSystemWriter.write_data
    if state.rank == 1:

        def full_disk(self, plan, planner):
            raise OSError(28, "No space left on device")

        dcp.FileSystemWriter.write_data = full_disk
    try:
        checkpointer.save(root, 2, model, optimizer, None, None, consumed_samples=8, config={})
        checkpointer.wait()
        message = None
    except CheckpointError as exc:
        message = str(exc)
    finally:
        dcp.FileSystemWriter.write_data = original
    return {"message": message, "tracker": (root / "latest_checkpointed_iteration.txt").read_text()}


def _corrupt_shard_fallback(root: Path) -> dict:
    """Two checkpoints; rank 3's shard of the newest is bit-flipped: every rank falls back together."""
    from megatron.checkpoint import Checkpointer

    state = ParallelState.initialize(2, 1, backend="gloo")
    model, optimizer = build(state)
    checkpointer = Checkpointer(state)
    checkpointer.save(root, 1, model, optimizer, None, None, consumed_samples=8, config={})
    expected = _weights(model)
    train(model, optimizer, state, range(1))
    checkpointer.save(root, 2, model, optimizer, None, None, consumed_samples=16, config={})
    state.barrier()
    if state.rank == 0:
        shard = root / "iter_0000002" / "__3_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    state.barrier()
    model, optimizer = build(state)
    loaded = checkpointer.load(root, model, optimizer, None, None)
    return {"iteration": loaded.iteration, "weights_equal": _same(_weights(model), expected)}


def _every_scenario(root: str) -> dict:
    root = Path(root)
    results = {}
    for name, kwargs in {
        "fp32": dict(distributed_optimizer=False, dtype=torch.float32, async_save=False),
        "bf16-distopt-async": dict(distributed_optimizer=True, dtype=torch.bfloat16, async_save=True),
        # the last stage's tied-embedding copy reads its fragments from the first stage's key
        "pp2-distopt": dict(distributed_optimizer=True, dtype=torch.bfloat16, async_save=False, tp=1, pp=2),
    }.items():
        results[name] = _round_trip(root / name, **kwargs)
    results["tp2pp2"] = _save_tp2_pp2(root / "reshard")
    results["dp4"] = _load_dp4(root / "reshard")
    results["shards"] = _distopt_shards(root / "shards")
    results["failing"] = _failing_background_write(root / "failing")
    results["fallback"] = _corrupt_shard_fallback(root / "fallback")
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("sharded")
    return run_distributed(_every_scenario, 4, str(root), timeout=600), root


@pytest.mark.parametrize("name", ["fp32", "bf16-distopt-async"])
def test_round_trip_at_tp2_dp2_is_bit_identical(results, name):
    per_rank, root = results
    for rank_results in per_rank:
        got = rank_results[name]
        assert got["loaded_iteration"] == 2
        assert got["losses_equal"], got["losses"]
        assert got["weights_equal"]
    if name.endswith("async"):
        assert per_rank[0][name]["written"] == root / name / "iter_0000002"
    common = json.loads((root / name / "iter_0000002" / "common.json").read_text())
    assert common["layout"] == {
        "world": 4,
        "tp": 2,
        "pp": 1,
        "dp": 2,
        "sequence_parallel": False,
        "distributed_optimizer": name.startswith("bf16-distopt"),
    }
    assert sorted(os.listdir(root / name / "iter_0000002" / "rng")) == [
        f"rank_0000{r}.json" for r in range(4)
    ]


def _reference_optimizer(per_rank: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Full tensors of the TP 2 x PP 2 run's optimizer state (the TP shards concatenated)."""
    merged: dict[str, dict[str, list]] = {}
    for rank_results in sorted(per_rank, key=lambda r: r["tp2pp2"]["tp_rank"]):
        for name, local in rank_results["tp2pp2"]["optimizer"].items():
            entry = merged.setdefault(
                name, {"dim": local["dim"], "exp_avg": [], "exp_avg_sq": [], "master": []}
            )
            for kind in ("exp_avg", "exp_avg_sq", "master"):
                entry[kind].append(local[kind])
    full = {}
    for name, entry in merged.items():
        dim = entry["dim"]
        kinds = ("exp_avg", "exp_avg_sq", "master")
        full[name] = {
            kind: torch.cat(entry[kind], dim) if dim is not None else entry[kind][0] for kind in kinds
        }
    return full


def test_reshard_tp2_pp2_to_dp4_with_distributed_optimizer(results):
    per_rank, _ = results
    weights = per_rank[0]["tp2pp2"]["weights"]
    optimizer = _reference_optimizer(per_rank)
    assert set(optimizer) == set(weights)
    for rank_results in per_rank:
        got = rank_results["dp4"]
        assert got["steps"] == {3.0}
        assert _same(got["weights"], weights)
        for name, offset, master, exp_avg, exp_avg_sq in got["fragments"]:
            end = offset + master.numel()
            assert torch.equal(master, optimizer[name]["master"].view(-1)[offset:end]), name
            assert torch.equal(exp_avg, optimizer[name]["exp_avg"].view(-1)[offset:end]), name
            assert torch.equal(exp_avg_sq, optimizer[name]["exp_avg_sq"].view(-1)[offset:end]), name
    # every element of every parameter is owned by exactly one DP rank
    owned = {name: torch.zeros(t.numel(), dtype=torch.int32) for name, t in weights.items()}
    for rank_results in per_rank:
        for name, offset, master, _, _ in rank_results["dp4"]["fragments"]:
            owned[name][offset : offset + master.numel()] += 1
    assert all(bool((count == 1).all()) for count in owned.values())
    expected = per_rank[0]["tp2pp2"]["next_loss"]
    got = per_rank[0]["dp4"]["next_loss"]
    assert abs(got - expected) <= BF16_LOSS_RTOL * abs(expected), (got, expected)


def test_reshard_tp2_pp2_to_one_process(results):
    from megatron.checkpoint import Checkpointer

    per_rank, root = results
    torch.set_num_threads(1)
    state = ParallelState.single("cpu")
    model, optimizer = build(state, dtype=torch.bfloat16, dropout=0.0)
    loaded = Checkpointer(state).load(root / "reshard", model, optimizer, None, None)
    assert (loaded.iteration, loaded.consumed_samples) == (3, 24)
    assert _same(_weights(model), per_rank[0]["tp2pp2"]["weights"])
    reference = _reference_optimizer(per_rank)
    for name, local in _local_optimizer_state(model, optimizer).items():
        for kind in ("exp_avg", "exp_avg_sq", "master"):
            assert torch.equal(local[kind], reference[name][kind]), (name, kind)
    next_loss = train(model, optimizer, state, [3])[0]
    expected = per_rank[0]["tp2pp2"]["next_loss"]
    assert abs(next_loss - expected) <= BF16_LOSS_RTOL * abs(expected), (next_loss, expected)


def test_distributed_optimizer_round_trip_at_pp2_dp2_is_bit_identical(results):
    per_rank, _ = results
    for rank_results in per_rank:
        got = rank_results["pp2-distopt"]
        assert got["loaded_iteration"] == 2
        assert got["losses_equal"], got["losses"]
        assert got["weights_equal"]


SAVED_KINDS = ("exp_avg", "exp_avg_sq", "master")  # bf16 parameters: both moments and the fp32 master
STEP_BYTES = 4  # optimizer/step, one fp32 scalar


def _distopt_reference(per_rank: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Full tensors of the TP 2 x DP 2 distributed-optimizer run's state, assembled from every rank's
    fragments (each element owned by exactly one DP rank; TP-replicated parameters identical on both
    TP ranks, so their TP rank 0 copy is the tensor)."""
    layout = per_rank[0]["shards"]["layout"]
    local, owned = {}, {}  # (name, tp rank) -> kind -> flat TP-local tensor; -> owners per element
    for rank_results in per_rank:
        for name, tp_rank, offset, *values in rank_results["shards"]["tp2dp2"]:
            numel = math.prod(layout[name][0])
            entry = local.setdefault((name, tp_rank), {k: torch.zeros(numel) for k in SAVED_KINDS})
            count = owned.setdefault((name, tp_rank), torch.zeros(numel, dtype=torch.int32))
            for kind, value in zip(SAVED_KINDS, values, strict=True):
                entry[kind][offset : offset + value.numel()] = value
            count[offset : offset + values[0].numel()] += 1
    assert len(owned) == 2 * len(layout) and all(bool((c == 1).all()) for c in owned.values())
    full = {}
    for name, (shape, dim) in layout.items():
        parts = [{k: v.view(shape) for k, v in local[(name, tp)].items()} for tp in (0, 1)]
        if dim is None:
            assert all(torch.equal(parts[0][k], parts[1][k]) for k in SAVED_KINDS), name
            full[name] = parts[0]
        else:
            full[name] = {k: torch.cat([parts[0][k], parts[1][k]], dim) for k in SAVED_KINDS}
    return full


def test_distributed_optimizer_state_reshards_exactly(results):
    """TP 2 x DP 2 fragments -> DP 4 fragments (another cut) -> DP 4 again: every value exact."""
    per_rank, _ = results
    reference = _distopt_reference(per_rank)
    layout = per_rank[0]["shards"]["layout"]
    cut_rows = [  # fragments of matrices that start or end inside a row: three boxes, not one
        (name, offset)
        for rank_results in per_rank
        for name, _, offset, value, *_ in rank_results["shards"]["tp2dp2"]
        if len(layout[name][0]) == 2
        and (offset % layout[name][0][1] or (offset + value.numel()) % layout[name][0][1])
    ]
    assert cut_rows
    for rank_results in per_rank:
        shards = rank_results["shards"]
        assert shards["dp4"], "every DP 4 rank owns fragments"
        for name, _, offset, *values in shards["dp4"]:
            for kind, value in zip(SAVED_KINDS, values, strict=True):
                expected = reference[name][kind].reshape(-1)[offset : offset + value.numel()]
                assert torch.equal(value, expected), (name, kind)
        assert len(shards["dp4-reloaded"]) == len(shards["dp4"])
        for got, saved in zip(shards["dp4-reloaded"], shards["dp4"], strict=True):
            assert got[:3] == saved[:3]
            assert all(torch.equal(a, b) for a, b in zip(got[3:], saved[3:], strict=True)), got[0]


def test_distributed_optimizer_checkpoint_to_one_process(results):
    """The TP 2 x DP 2 fragment checkpoint loads without the distributed optimizer, in one process."""
    from megatron.checkpoint import Checkpointer
    from megatron.checkpoint.readers import load_full_state

    per_rank, root = results
    torch.set_num_threads(1)
    state = ParallelState.single("cpu")
    model, optimizer = build(state, dtype=torch.bfloat16, dropout=0.0)
    assert Checkpointer(state).load(root / "shards" / "tp2dp2", model, optimizer, None, None).iteration == 2
    reference = _distopt_reference(per_rank)
    for name, local in _local_optimizer_state(model, optimizer).items():
        for kind in SAVED_KINDS:
            assert torch.equal(local[kind], reference[name][kind]), (name, kind)
    # the one-process readers (tools) assemble the same full tensors from the fragments' chunks
    moments = load_full_state(root / "shards" / "tp2dp2" / "iter_0000002", prefix="optimizer/exp_avg_sq/")
    assert moments.keys() == reference.keys()
    assert all(torch.equal(moments[name], reference[name]["exp_avg_sq"]) for name in moments)


def test_distributed_optimizer_stages_and_reads_only_its_own_fragments(results):
    """At DP 4 each rank stages and reads its own fragments' bytes (x 3 fp32 kinds), exactly; the old
    scheme (every DP rank staging and reading the full state) was about DP times larger. Model weights
    are DP-replicated: every rank stages its copy, and the DP group reads them once between its ranks
    (tests/distributed/test_checkpoint_replicated_read.py)."""
    per_rank, _ = results
    dp = len(per_rank)
    shards = [rank_results["shards"] for rank_results in per_rank]
    bytes_per_element = 4 * len(SAVED_KINDS)
    elements, padding = shards[0]["elements"], shards[0]["padding"]
    assert 0 <= padding < shards[0]["elements"] // dp
    assert sum(s["own_elements"] for s in shards) == elements  # the fragments tile every parameter
    for s in shards:
        own = s["own_elements"] * bytes_per_element
        assert s["staged"]["optimizer"] == own + STEP_BYTES, (s["staged"], own)
        assert s["read"]["optimizer"] == own + STEP_BYTES, (s["read"], own)
        # 1/DP of the state, give or take the bucket padding this rank's slices hold
        share = (elements + padding) / dp
        assert share - padding <= s["own_elements"] <= share
        replicated = elements * bytes_per_element  # what each rank staged and read before
        assert replicated / own >= dp * elements / (elements + padding) > dp - 1, (replicated, own)
        assert s["staged"]["model"] == s["model_bytes"]
    assert sum(s["read"]["model"] for s in shards) == shards[0]["model_bytes"]


def test_failing_background_write_on_one_rank_surfaces_at_every_rank_wait(results):
    per_rank, root = results
    for rank_results in per_rank:
        message = rank_results["failing"]["message"]
        assert message is not None
        assert "iter_0000002" in message and "rank 1" in message and "No space left on device" in message
        assert rank_results["failing"]["tracker"] == "1"
    assert sorted(p.name for p in (root / "failing").iterdir()) == [
        "iter_0000001",
        "latest_checkpointed_iteration.txt",
    ]


def test_corrupt_shard_makes_every_rank_fall_back_to_the_previous_checkpoint(results):
    per_rank, _ = results
    for rank_results in per_rank:
        assert rank_results["fallback"] == {"iteration": 1, "weights_equal": True}

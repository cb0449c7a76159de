"""The multi-rank harness and ParallelState's groups, on spawned gloo ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron.parallel import collectives
from megatron.parallel.state import ParallelState, rank_layout
from megatron.parallel.testing import DistributedTestError, run_distributed


def test_rank_layout_follows_megatron_order():
    layout = rank_layout(16, 2, 2)  # dp = 4
    assert layout["tp"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert layout["dp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["pp"][:2] == [[0, 8], [1, 9]]
    assert layout["model_parallel"][0] == [0, 1, 8, 9]
    assert layout["embedding"][0] == [0, 8]
    assert rank_layout(4, 1, 1)["dp"] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="world size 6 is not divisible by .*tensor-model-parallel-size 4"):
        rank_layout(6, 4, 1)


def _groups_and_collectives(tp: int, pp: int):
    state = ParallelState.initialize(tp, pp, sequence_parallel=True, backend="gloo")
    value = torch.tensor([float(state.rank)])
    sums = {
        name: collectives.all_reduce(value.clone(), getattr(state, f"{name}_group")).item()
        for name in ("tp", "dp", "pp", "model_parallel", "world")
    }
    collectives.COMM_BYTES.reset()
    gathered = collectives.all_gather(value.view(1, 1), state.tp_group, dim=1)
    scattered = collectives.reduce_scatter(torch.arange(4.0) * (state.rank + 1), state.tp_group, dim=0)
    # a middle dim: [2, 4, 3] reduce-scattered along dim 1 keeps columns 2 x rank .. 2 x rank + 1 of each row
    block = torch.arange(24.0).view(2, 4, 3) * (state.rank + 1)
    scattered_mid = collectives.reduce_scatter(block, state.tp_group, dim=1)
    gathered_mid = collectives.all_gather(scattered_mid, state.tp_group, dim=1)
    collectives.all_reduce(torch.zeros(6), state.dp_group)
    counted = {f"{kind}/{op}": float(value) for (kind, op), value in collectives.COMM_BYTES.by_op().items()}
    return {
        "ranks": (
            state.tensor_model_parallel_rank,
            state.data_parallel_rank,
            state.pipeline_model_parallel_rank,
        ),
        "sums": sums,
        "gathered": gathered.flatten().tolist(),
        "scattered": scattered.tolist(),
        "scattered_mid": scattered_mid.tolist(),
        "gathered_mid": gathered_mid.tolist(),
        "counted": counted,
        "sequence_parallel": state.sequence_parallel,
    }


def test_groups_and_collectives_on_four_ranks():
    results = run_distributed(_groups_and_collectives, 4, 2, 1, timeout=120)
    # world 4 = TP 2 x DP 2: ranks (tp, dp, pp)
    assert [r["ranks"] for r in results] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert [r["sums"]["tp"] for r in results] == [1.0, 1.0, 5.0, 5.0]
    assert [r["sums"]["dp"] for r in results] == [2.0, 4.0, 2.0, 4.0]
    assert [r["sums"]["pp"] for r in results] == [0.0, 1.0, 2.0, 3.0]  # size 1: identity
    assert all(r["sums"]["world"] == 6.0 for r in results)
    assert results[2]["gathered"] == [2.0, 3.0]
    # ranks 0 and 1 hold arange(4) * 1 and * 2: the sum is arange(4) * 3, split in halves
    assert results[0]["scattered"] == [0.0, 3.0] and results[1]["scattered"] == [6.0, 9.0]
    assert all(r["sequence_parallel"] for r in results)
    for r in results:  # TP pairs (0, 1) and (2, 3): factors rank+1 of both members summed
        factor = (1, 2) if r["ranks"][1] == 0 else (3, 4)
        total = (torch.arange(24.0).view(2, 4, 3) * sum(factor)).tolist()
        tp_rank = r["ranks"][0]
        assert r["scattered_mid"] == [row[2 * tp_rank : 2 * tp_rank + 2] for row in total]
        assert r["gathered_mid"] == total
        # ring bytes per rank over 2 ranks, fp32: all-gathers of 2 and 24 elements (the output), reduce-
        # scatters of 4 and 24 (the input) send half; the 6-element all-reduce over DP 2 sends all of it
        assert r["counted"] == {
            "tp/all_gather": 0.5 * 4 * (2 + 24),
            "tp/reduce_scatter": 0.5 * 4 * (4 + 24),
            "dp/all_reduce": 4 * 6.0,
        }


def _fail_on_rank_one():
    state = ParallelState.initialize(backend="gloo")
    if state.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    collectives.all_reduce(torch.ones(1), state.world_group)  # rank 0 would wait here forever
    return state.rank


def test_a_failing_rank_fails_the_run_with_its_traceback_and_no_hang():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*deliberate failure on rank 1"):
        run_distributed(_fail_on_rank_one, 2, timeout=600)
    # rank 0 would wait in its all-reduce for the 10-minute process-group timeout unless it is killed;
    # the bound leaves room for slow process start-up on a loaded machine
    assert time.monotonic() - start < 180


def _die_on_rank_zero():
    if int(os.environ["RANK"]) == 0:
        os._exit(3)
    time.sleep(300)


def test_a_dying_rank_is_reported_and_the_others_killed():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"rank\(s\) \[0\] died without reporting"):
        run_distributed(_die_on_rank_zero, 2, timeout=600)
    assert time.monotonic() - start < 180  # rank 1 sleeps 300 s: it was killed, not waited for


def _sleep_forever():
    time.sleep(600)


def test_timeout_kills_every_rank():
    with pytest.raises(DistributedTestError, match=r"timed out; rank\(s\) \[0, 1\]"):
        run_distributed(_sleep_forever, 2, timeout=8)


def test_missing_rendezvous_variables_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT, RANK not set"):
        ParallelState.initialize(2, 1)


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    from megatron.parallel.testing import FREE_PORT_RANGE, free_port, port_is_free

    ports = {free_port() for _ in range(20)}
    assert all(FREE_PORT_RANGE[0] <= port < FREE_PORT_RANGE[1] and port_is_free(port) for port in ports)
    assert len(ports) > 1  # random, not one fixed port that concurrent runs would share

"""The real training loop on 2 gloo ranks (PP 2, then DP 2 in the same spawn): one host sync per
iteration on every rank, a stop request (SIGTERM's flag) raised on one rank only stops both after
the same iteration, and the world-group collectives of an iteration are counted exactly (their bytes
grow with the world size through the per-rank non-finite-gradient slots, never with the model).

The flag is set on rank 1 before iteration STOP_AT starts, as the SIGTERM handler would; the step polls
it after that iteration's backward and sums it over the world inside its one host read, so every rank
leaves the loop after iteration STOP_AT. The counting is tests/host_syncs.py's (see
tests/unit/test_host_syncs.py for the one-process loop).
"""

from __future__ import annotations

import os

from megatron.parallel.collectives import COMM_BYTES, wire_bytes
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.host_syncs import loop_config, loop_syncs_per_iteration

STOP_AT = 5  # of 6 iterations: iterations 1-4 (two of them logging) are counted


def _run(state, workdir: str, dataset: str, tokenizer: str, *flags: str) -> dict:
    world = []  # (bytes, calls) of world-group collectives at each iteration's start

    def ask_on_rank_1(run, iteration):
        calls = sum(count for (kind, _), count in COMM_BYTES.calls.items() if kind == "world")
        world.append((COMM_BYTES.by_kind().get("world", 0), calls))
        if state.rank == 1 and iteration == STOP_AT - 1:
            run.stop_requested = True

    cfg = loop_config(workdir, dataset, tokenizer, "--fp32", *flags)
    per_iteration, run = loop_syncs_per_iteration(cfg, state, before_iteration=ask_on_rank_1)
    world_steps = [(b - a, calls_b - calls_a) for (a, calls_a), (b, calls_b) in zip(world, world[1:])]
    return {
        "syncs": per_iteration,
        "iteration": run.state.iteration,
        "losses": run.losses,
        "world": world_steps,
    }


def _two_ranks(workdir: str, dataset: str, tokenizer: str) -> dict:
    results = {}
    state = ParallelState.initialize(1, 2, backend="gloo")
    flags = ("--pipeline-model-parallel-size", "2")
    results["pp2"] = _run(state, os.path.join(workdir, "pp2"), dataset, tokenizer, *flags)
    state = ParallelState.initialize(1, 1, backend="gloo")
    flags = ("--use-distributed-optimizer", "--overlap-grad-reduce")
    results["dp2"] = _run(state, os.path.join(workdir, "dp2"), dataset, tokenizer, *flags)
    return results


def test_the_loop_syncs_once_per_iteration_and_every_rank_stops_together(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    ranks = run_distributed(_two_ranks, 2, str(tmp_path), tiny_dataset_prefix, str(tiny_tokenizer_path))
    for layout in ("pp2", "dp2"):
        for rank, result in enumerate(ranks):
            counts = [len(calls) for calls in result[layout]["syncs"]]
            assert counts == [1] * (STOP_AT - 1), (layout, rank, result[layout]["syncs"])
            assert result[layout]["iteration"] == STOP_AT, (layout, rank)
        assert ranks[0][layout]["losses"] == ranks[1][layout]["losses"]
        # world collectives per iteration: the step's flags (the stop flag and one non-finite-gradient
        # slot per rank, --check-for-nan-in-loss-and-grad: 1 + world size fp32 values); with the
        # distributed optimizer also the squared gradient norm summed over every gradient holder (one
        # fp32). Nothing grows with the model, nothing else runs per iteration.
        step = (wire_bytes("all_reduce", 4 * (1 + 2), 2), 1)
        if layout == "dp2":
            step = (step[0] + wire_bytes("all_reduce", 4, 2), 2)
        for result in ranks:
            assert result[layout]["world"] == [step] * (STOP_AT - 1), (layout, result[layout]["world"])

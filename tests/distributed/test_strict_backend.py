"""The strict backend (megatron/parallel/strict_backend.py) fails programs that break NCCL's rules on gloo.

One spawn of two ranks runs every case in order. A collective mismatch is seen by both ranks at the same
call, before any data moves, and a point-to-point mismatch after both ranks' messages have been matched
in order, so each rank catches the error, keeps its message and goes on with the same groups; the case
where a rank never issues the call (it waits in another group first) comes last, on groups of its own
with a 3-second timeout. The tests then check each rank's messages: the ranks, the operation, the shapes
and dtypes, the call's number. The swapped point-to-point case also runs on a plain gloo group, which
accepts it (its tags sort the messages out): the strict backend is what fails it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron.parallel import strict_backend
from megatron.parallel.state import ParallelState
from megatron.parallel.strict_backend import StrictCollectiveError, StrictProcessGroup
from megatron.parallel.testing import run_distributed

DEADLOCK_TIMEOUT = timedelta(seconds=3)


def _error(run) -> str | None:
    try:
        run()
    except StrictCollectiveError as error:
        return str(error)
    return None


def _correct_program(state: ParallelState) -> dict:
    """Every operation the framework uses, right; returns what each one produced."""
    rank, group = state.rank, state.world_group.pg
    total = torch.full((4,), float(rank + 1))
    dist.all_reduce(total, group=group)
    gathered = torch.zeros(6)
    own = gathered[3 * rank : 3 * rank + 3]
    own.fill_(rank + 10.0)
    pending = dist.all_gather_into_tensor(gathered, own, group=group, async_op=True)  # in place
    summed = torch.arange(4.0) * (rank + 1)
    dist.barrier(group=group)  # another collective while the gather is in flight
    pending.wait()
    dist.reduce_scatter_tensor(summed[2 * rank : 2 * rank + 2], summed, group=group)  # output aliases
    pieces = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(pieces, torch.full((2,), float(rank)), group=group)
    objects = [None, None]
    dist.all_gather_object(objects, {"rank": rank}, group=group)
    box = [f"from {rank}"]
    dist.broadcast_object_list(box, src=0, group=group)
    # the pipeline's pattern at two stages: activations forward with tag 0, gradients back with tag 1
    peer, received = 1 - rank, torch.zeros(3)
    sent = torch.full((3,), rank + 100.0)
    ops = [
        dist.P2POp(dist.isend, sent, peer, group, rank),
        dist.P2POp(dist.irecv, received, peer, group, peer),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return {
        "all_reduce": total.tolist(),
        "all_gather_into_tensor": gathered.tolist(),
        "reduce_scatter_tensor": summed[2 * rank : 2 * rank + 2].tolist(),
        "all_gather": [piece.tolist() for piece in pieces],
        "all_gather_object": objects,
        "broadcast_object_list": box,
        "p2p": received.tolist(),
    }


def _collective_mismatches(state: ParallelState) -> dict:
    rank, group = state.rank, state.world_group.pg
    chunked = torch.zeros(4)  # rank 1 passes its own chunk (in place), rank 0 rank 1's chunk
    swapped = [
        lambda: dist.all_reduce(torch.ones(3), group=group),
        lambda: dist.all_gather_into_tensor(torch.empty(4), torch.ones(2), group=group),
    ]
    return {
        "swapped": _error(lambda: swapped[rank]()),  # rank 0 all-reduces while rank 1 gathers
        "recovered": _error(lambda: dist.all_reduce(torch.ones(1), group=group)),
        "shape": _error(lambda: dist.all_reduce(torch.ones(2 + rank, 4), group=group)),
        "dtype": _error(
            lambda: dist.all_reduce(torch.ones(2, dtype=(torch.float32, torch.bfloat16)[rank]), group=group)
        ),
        "reduce_op": _error(
            lambda: dist.all_reduce(
                torch.ones(2), op=(dist.ReduceOp.SUM, dist.ReduceOp.MAX)[rank], group=group
            )
        ),
        "non_contiguous": _error(
            lambda: dist.all_reduce(torch.ones(4, 4).t() if rank else torch.ones(4, 4), group=group)
        ),
        "non_contiguous_send": _error(lambda: dist.isend(torch.ones(4, 2).t(), 1 - rank, group=group)),
        "wrong_chunk": _error(lambda: dist.all_gather_into_tensor(chunked, chunked[2:], group=group)),
        "unsupported": _error(lambda: dist.all_to_all_single(torch.empty(2), torch.ones(2), group=group)),
    }


def _swapped_p2p(group) -> tuple[str | None, list[float]]:
    """Rank 0 sends tag 1 then tag 2; rank 1 posts the receive for tag 2 first. Returns rank 1's error
    and what its tag-1 receive got."""
    if dist.get_rank() == 0:
        requests = [
            dist.isend(torch.ones(3), 1, group=group, tag=1),
            dist.isend(torch.zeros(3), 1, group=group, tag=2),
        ]
        for request in requests:
            request.wait()
        return None, []
    first, second = torch.full((3,), -1.0), torch.full((3,), -1.0)
    late = dist.irecv(second, 0, group=group, tag=2)
    early = dist.irecv(first, 0, group=group, tag=1)
    error = _error(late.wait)
    also = _error(early.wait)  # under NCCL the second receive is just as wrong
    assert (error is None) == (also is None), (error, also)
    return error, first.tolist()


def _unmatched_call(rank: int) -> str | None:
    """Each rank all-reduces first on a group the other enters second: NCCL would hang."""
    groups = [dist.new_group([0, 1], timeout=DEADLOCK_TIMEOUT) for _ in range(2)]
    return _error(lambda: dist.all_reduce(torch.ones(2), group=groups[rank]))


def _cases() -> dict:
    os.environ[strict_backend.ENV_FLAG] = "1"  # turns the gloo asked for here into the strict backend
    state = ParallelState.initialize(2, 1, backend="gloo")
    results = {
        "backend": state.backend,
        "strict_groups": [isinstance(g.pg, StrictProcessGroup) for g in (state.tp_group, state.world_group)],
        "correct": _correct_program(state),
    }
    results.update(_collective_mismatches(state))
    results["p2p_strict"] = _swapped_p2p(state.world_group.pg)
    results["p2p_gloo"] = _swapped_p2p(dist.new_group([0, 1], backend="gloo"))
    results["after_p2p"] = _correct_program(state)  # the groups still work after every caught mismatch
    from torch.distributed.device_mesh import init_device_mesh  # the checkpoint's mesh, on this backend

    results["mesh"] = dist.get_backend(init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)).get_group("dp"))
    results["unmatched"] = _unmatched_call(state.rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_cases, 2, timeout=120)


def test_a_correct_program_runs_and_moves_the_right_data(ranks):
    for rank, result in enumerate(ranks):
        assert result["backend"] == "strict" and result["strict_groups"] == [True, True]
        assert result["mesh"] == "strict"
        expected = {
            "all_reduce": [3.0] * 4,
            "all_gather_into_tensor": [10.0] * 3 + [11.0] * 3,
            "reduce_scatter_tensor": [6.0 * rank, 6.0 * rank + 3.0],  # (0, 1, 2, 3) x (1 + 2), rank's half
            "all_gather": [[0.0, 0.0], [1.0, 1.0]],
            "all_gather_object": [{"rank": 0}, {"rank": 1}],
            "broadcast_object_list": ["from 0"],
            "p2p": [101.0 - rank] * 3,
        }
        assert result["correct"] == expected
        assert result["after_p2p"] == expected  # caught mismatches leave the groups usable
        assert result["recovered"] is None


def test_collectives_issued_in_different_orders_fail_on_every_rank(ranks):
    for result in ranks:
        message = result["swapped"]
        assert message is not None
        assert "differs between ranks" in message and "ranks [0, 1]" in message
        assert "rank 0: all_reduce(sum) float32[3]" in message
        assert "rank 1: all_gather_into_tensor float32[2] -> float32[4]" in message
    assert ranks[0]["swapped"] == ranks[1]["swapped"]
    calls = [int(m.split("call #")[1].split()[0]) for m in (ranks[0]["swapped"], ranks[0]["shape"])]
    assert calls[1] == calls[0] + 2  # numbered per group: the recovered all-reduce came between


@pytest.mark.parametrize(
    "case, rank0, rank1",
    [
        ("shape", "all_reduce(sum) float32[2, 4]", "all_reduce(sum) float32[3, 4]"),
        ("dtype", "all_reduce(sum) float32[2]", "all_reduce(sum) bfloat16[2]"),
        ("reduce_op", "all_reduce(sum) float32[2]", "all_reduce(max) float32[2]"),
    ],
)
def test_shapes_dtypes_and_reduce_ops_must_agree(ranks, case, rank0, rank1):
    for result in ranks:
        assert f"rank 0: {rank0}; rank 1: {rank1}" in result[case]


def test_a_non_contiguous_tensor_fails(ranks):
    for result in ranks:  # both ranks raise, naming the rank that passed it
        assert (
            "rank 1: all_reduce(sum) float32[4, 4]: tensor float32[4, 4] is not contiguous"
            in result["non_contiguous"]
        )
        assert "rank 0:" not in result["non_contiguous"]
        assert "float32[2, 4] is not contiguous (strides (1, 2))" in result["non_contiguous_send"]


def test_an_in_place_gather_from_another_ranks_chunk_fails(ranks):
    for result in ranks:
        assert (
            "rank 0: all_gather_into_tensor float32[2] -> float32[4]: input overlaps the output but is not "
            in (result["wrong_chunk"])
        )
        assert "rank 1:" not in result["wrong_chunk"]


def test_an_operation_without_a_fingerprint_fails_instead_of_running_unchecked(ranks):
    for result in ranks:
        assert "not supported by the strict backend" in result["unsupported"]


def test_point_to_point_messages_that_only_tags_keep_apart_fail(ranks):
    error, received = ranks[1]["p2p_gloo"]
    assert error is None and received == [1.0] * 3  # gloo matches by tag: the receive of tag 1 got the ones
    error, _ = ranks[1]["p2p_strict"]
    assert error is not None
    # message 2 from rank 0 to rank 1 on this group (the correct program's was the first)
    assert (
        "rank 1 posted receive #2 (tag 2, float32[3]) from rank 0 on the process group of ranks [0, 1]"
        in error
    )
    assert "rank 0's send #2 (tag 1, float32[3])" in error
    assert ranks[0]["p2p_strict"] == (None, [])


def test_a_call_not_issued_by_every_rank_fails_by_the_timeout_naming_what_each_waits_in(ranks):
    for rank, result in enumerate(ranks):
        message = result["unmatched"]
        assert message is not None and f"rank {rank}: call #1 on the process group of ranks [0, 1]" in message
        assert "was not issued by every rank of the group (waited up to the timeout, 0:00:03)" in message
        # the other rank wrote what it waits in: its first call, on the other group of the same ranks
        other = message.split("Waiting at the time: ")[1]
        assert other.startswith(f"rank {1 - rank}: call #1 on the process group of ranks [0, 1] (group ")
        assert "all_reduce(sum) float32[2]" in other
        assert message.split("(group ")[1].split(")")[0] != other.split("(group ")[1].split(")")[0]


def test_fingerprint_records_round_trip_and_registration_is_idempotent():
    record = strict_backend._encode("x" * 1000, 512, digest_of="x", flag=True)
    digest, flag, text = strict_backend._decode(record)
    assert record.numel() == 512 and flag and text == "x" * (512 - 17)
    assert digest == strict_backend._decode(strict_backend._encode("x", 512))[0]
    assert digest != strict_backend._decode(strict_backend._encode("y", 512))[0]
    assert strict_backend.describe(torch.empty(2, 3, dtype=torch.bfloat16)) == "bfloat16[2, 3]"
    strict_backend.register()
    strict_backend.register()
    assert dist.Backend.STRICT == "strict"

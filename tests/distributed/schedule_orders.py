"""The orders the pipeline schedules must run on one rank, written from the schedules' definitions (docs/
parallelism.md, Megatron's 1F1B and interleaved 1F1B), independently of megatron/parallel/pipeline.py: the
oracles tests/distributed/test_pipeline.py compares the real schedules' traces with, and the planner's
in-flight counts are checked against. An order is a list of (kind, micro_batch, chunk), kind "F" or "B",
as the schedules' `trace` records it.

1F1B on rank r of P with m micro-batches: min(P - r - 1, m) warm-up forwards, then one forward and one
backward in turn, then the backwards left. Interleaved 1F1B with V chunks per rank (m a multiple of P):
forwards in groups of P micro-batches through chunk 0, then the same P through chunk 1, ..., V - 1, then
the next group; backwards likewise, from chunk V - 1 down to 0. Warm-up (P - r - 1) * 2 + (V - 1) * P
forwards (at most all of them), and every forward first when m == P; then 1F1B; then the backwards left.
"""

from __future__ import annotations

from itertools import zip_longest

Order = list[tuple[str, int, int]]


def expected_1f1b_order(pp: int, rank: int, num_micro_batches: int, *, forward_only: bool = False) -> Order:
    """What 1F1B runs on pipeline rank `rank` of `pp` (one chunk: chunk 0)."""
    forwards = [("F", micro_batch, 0) for micro_batch in range(num_micro_batches)]
    if forward_only:
        return forwards
    backwards = [("B", micro_batch, 0) for micro_batch in range(num_micro_batches)]
    return _warm_up_then_alternate(forwards, backwards, min(pp - rank - 1, num_micro_batches))


def expected_interleaved_order(
    pp: int, rank: int, num_micro_batches: int, num_chunks: int, *, forward_only: bool = False
) -> Order:
    """What interleaved 1F1B runs on pipeline rank `rank` of `pp` with `num_chunks` chunks."""
    assert num_micro_batches % pp == 0, "interleaving needs a multiple of pp micro-batches"
    forwards = _in_groups("F", pp, num_micro_batches, range(num_chunks))
    if forward_only:
        return forwards
    backwards = _in_groups("B", pp, num_micro_batches, range(num_chunks - 1, -1, -1))
    if num_micro_batches == pp:
        warmup = len(forwards)
    else:
        warmup = min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, len(forwards))
    return _warm_up_then_alternate(forwards, backwards, warmup)


def max_in_flight(order: Order) -> int:
    """The most forwards whose backward has not run yet at any point of `order` (the activation sets a
    rank holds at its peak); a backward without its forward before it fails the test."""
    live: set[tuple[int, int]] = set()
    peak = 0
    for kind, micro_batch, chunk in order:
        if kind == "F":
            live.add((micro_batch, chunk))
            peak = max(peak, len(live))
        else:
            assert (micro_batch, chunk) in live, f"B{micro_batch}.{chunk} before its forward"
            live.remove((micro_batch, chunk))
    return peak


def parse_order(text: str) -> Order:
    """ "F0.0 F1.0 B0.1 ..." (kind, micro-batch, "." chunk; chunk 0 when left out) as an order."""
    order = []
    for step in text.split():
        micro_batch, _, chunk = step[1:].partition(".")
        order.append((step[0], int(micro_batch), int(chunk or 0)))
    return order


def _in_groups(kind: str, pp: int, num_micro_batches: int, chunks) -> Order:
    """Each group of `pp` consecutive micro-batches through `chunks` in turn, group after group."""
    return [
        (kind, first + i, chunk)
        for first in range(0, num_micro_batches, pp)
        for chunk in chunks
        for i in range(pp)
    ]


def _warm_up_then_alternate(forwards: Order, backwards: Order, warmup: int) -> Order:
    """The first `warmup` forwards, then the next forward and the next backward in turn until the
    forwards run out, then the remaining backwards."""
    order = list(forwards[:warmup])
    for forward, backward in zip_longest(forwards[warmup:], backwards):
        if forward is not None:
            order.append(forward)
        order.append(backward)
    return order

"""Cost of the strict backend (gloo checking NCCL's rules) per operation, against plain gloo in the same run.

Two ranks (`--world` to change) hold a plain gloo group and a strict group over the same ranks, and time
the same operations on each, alternating in `--rounds` rounds (median shown): an all-reduce of a small
tensor (the tensor-parallel layers' kind: 2 x 32 x 64 fp32), an all-reduce of a 4 MB gradient bucket,
an all-gather into a tensor and a reduce-scatter of the bucket, and a pipeline step's pair of
point-to-point messages (`batch_isend_irecv`, one send and one receive each way). The strict backend
adds one fingerprint all-gather (512 bytes per rank) per collective and one 256-byte header per
message: a fixed cost per call, so the ratio is largest for small tensors. The number to read is the
added microseconds per call; tests issue thousands of calls, so a test spends about calls x that more.

Usage: python bench/strict_backend.py [--calls 200] [--rounds 3] [--world 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _operations(dist, torch, rank: int, world: int) -> dict:
    small = torch.ones(2, 32, 64)
    bucket = torch.ones(1 << 20)
    shard = torch.empty((1 << 20) // world)
    peer_next, peer_prev = (rank + 1) % world, (rank - 1) % world
    sent, received = torch.ones(2, 32, 64), torch.empty(2, 32, 64)

    def p2p(group):
        ops = [
            dist.P2POp(dist.isend, sent, peer_next, group, 0),
            dist.P2POp(dist.irecv, received, peer_prev, group, 0),
        ]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    return {
        "all_reduce 16 KB": lambda group: dist.all_reduce(small, group=group),
        "all_reduce 4 MB": lambda group: dist.all_reduce(bucket, group=group),
        "all_gather_into_tensor 4 MB": lambda group: dist.all_gather_into_tensor(bucket, shard, group=group),
        "reduce_scatter_tensor 4 MB": lambda group: dist.reduce_scatter_tensor(shard, bucket, group=group),
        "p2p step 16 KB": p2p,
    }


def _worker(calls: int, rounds: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron.parallel.state import ParallelState

    state = ParallelState.initialize(backend="strict")
    groups = {"gloo": dist.new_group(backend="gloo"), "strict": state.world_group.pg}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, run in _operations(dist, torch, state.rank, state.world_size).items():
            for backend, group in groups.items():
                run(group)  # warm-up (first-call allocations)
                dist.barrier(group=groups["gloo"])
                start = time.perf_counter()
                for _ in range(calls):
                    run(group)
                times.setdefault((name, backend), []).append((time.perf_counter() - start) / calls)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per operation, backend and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median shown)")
    parser.add_argument("--world", type=int, default=2, help="ranks")
    args = parser.parse_args(argv)
    from megatron.parallel.testing import run_distributed

    results = run_distributed(_worker, args.world, args.calls, args.rounds, timeout=1800)
    slowest = {key: max(result[key] for result in results) for key in results[0]}  # the rank that waited most
    print(f"{args.world} ranks, {args.calls} calls x {args.rounds} rounds (median), microseconds per call")
    print(f"{'operation':30s} {'gloo':>10s} {'strict':>10s} {'added':>10s} {'ratio':>7s}")
    for name in dict.fromkeys(name for name, _ in slowest):
        gloo, strict = slowest[(name, "gloo")] * 1e6, slowest[(name, "strict")] * 1e6
        print(f"{name:30s} {gloo:10.1f} {strict:10.1f} {strict - gloo:10.1f} {strict / gloo:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

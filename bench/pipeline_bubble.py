"""The pipeline bubble, measured: per-stage idle fraction of 1F1B and interleaved 1F1B at several
micro-batch counts, next to the theory, (p - 1) / (m + p - 1) and (p - 1) / (v * m + p - 1).

Each of `--stages` gloo ranks runs a stage of a synthetic model through the real schedules and p2p
(`megatron.training.step.forward_backward`): every stage's forward of a micro-batch sleeps
`--forward-ms` and its backward twice that (split evenly over the v chunks when interleaved), inside a
custom autograd function, so the stages are exactly equal and 4 stages fit on 2 cores (sleeping uses no
CPU). A stage's idle fraction is 1 - (time it spent in that work) / (wall time of the step, from a
barrier before to a barrier after). The theory assumes free communication; the difference from it is
the schedule's overhead (p2p latency, Python), which interleaving pays v times per micro-batch.

Usage: python bench/pipeline_bubble.py [--stages 4] [--forward-ms 10] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HIDDEN = 16
MICRO_BATCH = 1
SEQ = 8


def _sleep_model(pp: int, rank: int, num_chunks: int, forward_s: float, backward_s: float):
    """A model with GPTModel's pipeline interface whose chunks only sleep (forward and backward)."""
    import torch
    from torch import nn

    class Work(torch.autograd.Function):
        """Identity that sleeps `forward_s` in forward and `backward_s` in backward, timing both."""

        @staticmethod
        def forward(ctx, x, model):
            ctx.model = model
            model.sleep(forward_s / num_chunks)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            ctx.model.sleep(backward_s / num_chunks)
            return grad, None

    class SleepModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_chunks = num_chunks
            self.scale = nn.Parameter(torch.ones(num_chunks))  # so every chunk's backward runs
            self.busy_seconds = 0.0

        def sleep(self, seconds: float) -> None:
            start = time.perf_counter()
            time.sleep(seconds)
            self.busy_seconds += time.perf_counter() - start

        def chunk_is_first(self, chunk: int) -> bool:
            return rank == 0 and chunk == 0

        def chunk_is_last(self, chunk: int) -> bool:
            return rank == pp - 1 and chunk == num_chunks - 1

        def pipeline_hidden_shape(self, micro_batch_size: int, seq_length: int) -> tuple[int, int, int]:
            return (micro_batch_size, seq_length, HIDDEN)

        def forward_chunk(self, chunk, *, tokens=None, hidden=None, labels=None, **_):
            if self.chunk_is_first(chunk):
                hidden = tokens.float().unsqueeze(-1).expand(*tokens.shape, HIDDEN)  # [b, s, h]
            x = Work.apply(hidden * self.scale[chunk], self)  # [b, s, h]
            return x.mean(-1) if self.chunk_is_last(chunk) else x  # "per-token loss" [b, s]

    return SleepModel()


def _stage(runs: list[tuple[int, int]], forward_s: float, repeats: int) -> dict:
    """On each rank: (idle fraction, step seconds, busy seconds) of this stage, medians over the repeats,
    for each (num_chunks, micro-batches) of `runs`."""
    import torch

    from megatron.parallel.state import ParallelState
    from megatron.training.step import forward_backward

    state = ParallelState.initialize(1, int(os.environ["WORLD_SIZE"]), backend="gloo")
    pp, rank = state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank
    batch = {
        "tokens": torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long),
        "labels": torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long),
        "loss_mask": torch.ones(MICRO_BATCH, SEQ),
    }
    results = {}
    for num_chunks, m in runs:
        model = _sleep_model(pp, rank, num_chunks, forward_s, 2 * forward_s)
        steps, busy = [], []
        for repeat in range(repeats + 1):  # the first run warms up (allocations, gloo pairs)
            model.busy_seconds = 0.0
            state.barrier()
            start = time.perf_counter()
            forward_backward(model, None, [batch] * m, state)
            state.barrier()
            if repeat:
                steps.append(time.perf_counter() - start)
                busy.append(model.busy_seconds)
        step, work = statistics.median(steps), statistics.median(busy)
        results[(num_chunks, m)] = (1.0 - work / step, step, work)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages (gloo ranks)")
    parser.add_argument("--forward-ms", type=float, default=20.0, help="forward per micro-batch per stage")
    parser.add_argument("--virtual", type=int, default=2, help="chunks per stage for interleaved 1F1B")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (median)")
    parser.add_argument("--quick", action="store_true", help="10 ms forwards, m 4 and 8, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.forward_ms, args.micro_batches, args.repeats = 10.0, [4, 8], 1
    p, v = args.stages, args.virtual
    counts = [m for m in args.micro_batches if m % p == 0]  # interleaving needs m % p == 0
    runs = [(1, m) for m in args.micro_batches] + [(v, m) for m in counts]

    from megatron.parallel.testing import run_distributed

    start = time.perf_counter()
    per_stage = run_distributed(_stage, p, runs, args.forward_ms / 1000.0, args.repeats, timeout=1200)
    print(
        f"pipeline bubble: {p} stages on gloo, sleep-based work of {args.forward_ms:g} ms forward + "
        f"{2 * args.forward_ms:g} ms backward per micro-batch per stage; median of {args.repeats} step(s)"
    )
    print(
        f"{'schedule':<16}{'m':>4}  {'theory':>7}  {'mean':>6}  {'ratio':>6}  {'step ms':>8}  {'ideal ms':>8}"
        "   idle fraction per stage"
    )
    for num_chunks, m in runs:
        theory = (p - 1) / (num_chunks * m + p - 1)
        measured = [stage[(num_chunks, m)] for stage in per_stage]
        mean = statistics.mean(idle for idle, _, _ in measured)
        step = statistics.mean(step for _, step, _ in measured)
        ideal = statistics.mean(work for _, _, work in measured) / (1.0 - theory)  # free communication
        name = "1F1B" if num_chunks == 1 else f"interleaved v={num_chunks}"
        stages = " ".join(f"{idle:.3f}" for idle, _, _ in measured)
        print(
            f"{name:<16}{m:>4}  {theory:>7.3f}  {mean:>6.3f}  {mean / theory:>6.2f}  {1e3 * step:>8.1f}  "
            f"{1e3 * ideal:>8.1f}   {stages}"
        )
    print(
        f"(ratio: measured mean idle / theory; ideal ms: the step with the measured work and the theoretical "
        f"bubble; {time.perf_counter() - start:.1f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

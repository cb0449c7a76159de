"""What tensor and data parallelism cost on gloo: tokens/s of the tiny model at TP 1 vs TP 2 and DP 1 vs
DP 2, with the time spent inside collectives shown separately.

Every layout trains the same global batch (the tiny-cpu preset's model: 4 layers, hidden 128, 4 query
heads with one shared K/V head, seq 256) for `--iters` timed iterations after `--warmup`, each rank in
its own process with one thread, through the real train step and optimizer. "comm" is the wall time
spent in collectives (`megatron.parallel.collectives.COMM_TIMER`; gloo collectives are synchronous, so
it includes waiting for the slower rank). Reference numbers come from the one-process run measured in
the same invocation, so machine load affects both sides.

Usage: python bench/parallel_overhead.py [--iters 8] [--global-batch 16] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

LAYOUTS = [  # (label, world size, tensor-parallel size, extra parallel flags)
    ("TP1 DP1", 1, 1, {}),
    ("TP2", 2, 2, {}),
    ("TP2 +SP", 2, 2, {"sequence_parallel": True}),
    ("DP2", 2, 1, {}),
    ("DP2 overlap", 2, 1, {"overlap_grad_reduce": True}),
    ("DP2 distopt", 2, 1, {"use_distributed_optimizer": True}),
]


def _worker(tp: int, flags: dict, shape: dict, warmup: int, iters: int) -> dict:
    import torch

    from megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from megatron.model import GPTModel
    from megatron.parallel.collectives import COMM_TIMER
    from megatron.parallel.state import ParallelState
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step

    sequence_parallel = flags.get("sequence_parallel", False)
    state = ParallelState.initialize(tp, 1, sequence_parallel=sequence_parallel, backend="gloo")
    state.seed(1234)
    config = ModelConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        attention_head_type="multiquery",
        seq_length=shape["seq"],
        max_position_embeddings=shape["seq"],
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    model = GPTModel(config, shape["vocab"], state)
    model.init_weights(1234)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, **flags)
    optimizer = build_optimizer(
        model, OptimizerConfig(lr=1e-3, clip_grad=1.0), parallel_state=state, parallel_config=parallel
    )
    per_rank = shape["global_batch"] // state.data_parallel_size
    generator = torch.Generator().manual_seed(state.data_parallel_rank)
    tokens = torch.randint(0, shape["vocab"], (per_rank, shape["seq"] + 1), generator=generator)
    micro = shape["micro_batch"]
    batches = [
        {
            "tokens": tokens[i : i + micro, :-1].contiguous(),
            "labels": tokens[i : i + micro, 1:].contiguous(),
            "loss_mask": torch.ones(micro, shape["seq"]),
        }
        for i in range(0, per_rank, micro)
    ]
    for _ in range(warmup):
        train_step(model, optimizer, batches, state)
    state.barrier()
    COMM_TIMER.reset()
    start = time.perf_counter()
    for _ in range(iters):
        train_step(model, optimizer, batches, state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "comm": COMM_TIMER.seconds, "calls": COMM_TIMER.calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per layout (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per iteration (default 16)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    parser.add_argument("--seq-length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--quick", action="store_true", help="3 timed iterations of 8 sequences")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.global_batch = 3, 1, 8
    if args.global_batch % (2 * args.micro_batch):
        parser.error("--global-batch must be a multiple of 2 x --micro-batch (DP 2 splits it)")

    from megatron.parallel.testing import run_distributed

    shape = {
        "seq": args.seq_length,
        "vocab": 1024,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
    }
    tokens = args.global_batch * args.seq_length * args.iters
    print(
        f"tiny model (4 layers, hidden 128, MQA), global batch {args.global_batch} x {args.seq_length} tokens, "
        f"{args.iters} timed iterations, gloo, 1 thread per rank"
    )
    print(f"{'layout':<14}{'tokens/s':>10}{'s/iter':>9}{'comm s/iter':>13}{'comm %':>8}{'vs 1 proc':>11}")
    base = None
    for label, world, tp, flags in LAYOUTS:
        results = run_distributed(_worker, world, tp, flags, shape, args.warmup, args.iters, timeout=900)
        seconds = max(r["seconds"] for r in results)
        comm = max(r["comm"] for r in results)
        rate = tokens / seconds
        base = base or rate
        print(
            f"{label:<14}{rate:>10.0f}{seconds / args.iters:>9.3f}{comm / args.iters:>13.3f}"
            f"{100 * comm / seconds:>7.1f}%{rate / base:>10.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

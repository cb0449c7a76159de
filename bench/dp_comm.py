"""Bytes on the wire of data-parallel gradient and parameter synchronisation, counted vs planned vs the
former scheme, on gloo at DP 2 and DP 4.

Each layout trains a small GPT (4 layers, hidden 128, multi-query, seq 256; the shape of
bench/parallel_overhead.py) for `--iters` steps with the distributed optimizer through the real train
step, one process per rank. Per step and rank it reports:
- counted: the bytes `collectives.COMM_BYTES` recorded for the data-parallel group's gradient
  reduce-scatters and parameter all-gathers (ring model, exact fractions);
- planned: the `--dry-run` table's data-parallel bytes for the same flags (`megatron.planner`);
- before: the former scheme, an all-reduce of every fp32 gradient bucket (then reading the own slice)
  plus the same all-gather, priced with the same formula; and the plain optimizer's all-reduce;
- time: seconds of one reduce-scatter of the whole gradient buffer vs one all-reduce of it (after a
  warm-up, mean of `--repeats`), measured in the same run on the same buffer. gloo on CPU: its
  reduce-scatter is not the bandwidth-optimal ring NCCL runs, so this column says nothing about GPUs.
Ratios are counted / before; the gradient part alone is half (reduce-scatter vs all-reduce).

Usage: python bench/dp_comm.py [--iters 3] [--repeats 10] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
import time

FLAGS = [
    *("--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4"),
    *("--attention-head-type", "multiquery", "--seq-length", "256", "--max-position-embeddings", "256"),
    *("--vocab-size", "1024", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "0.001"),
    *("--use-distributed-optimizer", "--ddp-bucket-size", "100000"),
]


def _worker(argv: list[str], iters: int, repeats: int) -> dict:
    import torch

    from megatron.config import OptimizerConfig, load_config
    from megatron.model import build_model
    from megatron.parallel import collectives
    from megatron.parallel.collectives import COMM_BYTES
    from megatron.parallel.state import ParallelState
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step

    torch.set_num_threads(1)
    state = ParallelState.initialize(1, 1, backend="gloo")
    cfg = load_config(argv, world_size=state.world_size, check_paths=False)
    state.seed(1234)
    model = build_model(cfg.model, cfg.model.vocab_size, state, cfg.parallel)
    model.init_weights(1234)
    model.to(torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32)
    optimizer = build_optimizer(
        model, OptimizerConfig(lr=1e-3), parallel_state=state, parallel_config=cfg.parallel
    )
    generator = torch.Generator().manual_seed(state.data_parallel_rank)
    micro, seq, vocab = cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (micro, seq + 1), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro, seq)}
    COMM_BYTES.reset()
    for _ in range(iters):
        train_step(model, optimizer, [batch], state)
    optimizer.finish_param_sync()
    sync = {op: value / iters for (kind, op), value in COMM_BYTES.by_op().items() if kind == "dp"}
    buffer = optimizer.grad_buffer.data
    chunk = buffer.chunk(state.data_parallel_size)[state.data_parallel_rank]
    timings = {}
    for name, run in (
        ("reduce_scatter", lambda: collectives.reduce_scatter_tensor_async(chunk, buffer, state.dp_group)),
        ("all_reduce", lambda: collectives.all_reduce_async(buffer, state.dp_group)),
    ):
        collectives.wait(run())  # warm-up
        state.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            collectives.wait(run())
        timings[name] = (time.perf_counter() - start) / repeats
    return {
        "sync": sync,
        "grad_bytes": buffer.numel() * 4,
        "param_bytes": buffer.numel() * torch.finfo(optimizer.grad_buffer.buckets[0].dtype).bits // 8,
        "timings": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3, help="training steps per layout (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed collectives of each kind (default 10)")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (all-gathers half the bytes)")
    args = parser.parse_args(argv)

    from megatron.config import load_config
    from megatron.parallel.collectives import wire_bytes
    from megatron.parallel.testing import run_distributed
    from megatron.planner import plan

    flags = [*FLAGS, "--bf16" if args.bf16 else "--fp32"]
    print(
        f"4 layers, hidden 128, MQA, seq 256, distributed optimizer, {'bf16' if args.bf16 else 'fp32'} "
        f"parameters; data-parallel bytes sent per rank per step (MB), gloo, {args.iters} steps"
    )
    print(
        f"{'DP':<4}{'counted':>10}{'planned':>10}{'before':>10}{'ratio':>8}{'grad RS':>10}{'grad AR':>10}"
        f"{'ratio':>8}{'RS s':>9}{'AR s':>9}{'ratio':>8}"
    )
    for dp in (2, 4):
        results = run_distributed(_worker, dp, flags, args.iters, args.repeats, timeout=900)
        planned = plan(load_config(flags, world_size=dp, check_paths=False))["stages"][0].sync_bytes
        planned_dp = sum(value for (kind, _), value in planned.items() if kind == "dp")
        for rank, result in enumerate(results):
            sync, grad_bytes = result["sync"], result["grad_bytes"]
            counted = sync.get("reduce_scatter", 0) + sync.get("all_gather", 0)
            all_reduce = wire_bytes("all_reduce", grad_bytes, dp)
            before = all_reduce + wire_bytes("all_gather", result["param_bytes"], dp)
            if counted != planned_dp:
                print(f"rank {rank}: counted {counted} != planned {planned_dp}", file=sys.stderr)
                return 1
            if rank:
                continue
            rs, ar = result["timings"]["reduce_scatter"], result["timings"]["all_reduce"]
            print(
                f"{dp:<4}{float(counted) / 1e6:>10.3f}{float(planned_dp) / 1e6:>10.3f}{float(before) / 1e6:>10.3f}"
                f"{float(counted / before):>8.3f}{float(sync['reduce_scatter']) / 1e6:>10.3f}"
                f"{float(all_reduce) / 1e6:>10.3f}{float(sync['reduce_scatter'] / all_reduce):>8.3f}"
                f"{rs:>9.4f}{ar:>9.4f}{rs / ar:>8.3f}"
            )
    print("counted == planned on every rank (exact); ratio = this scheme / the former all-reduce scheme")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the --dry-run plan against a real training step on this device.

Builds the run's model and optimizer exactly as `megatron.pretrain` does (one process, TP = PP = DP = 1),
runs training steps on random tokens, and prints measured / planned ratios for:
- static memory (weights + fp32 gradient buffer + fp32 masters and Adam moments), measured as the memory
  allocated between steps (CUDA only);
- activation memory of one micro-batch: on CUDA the peak allocated during a forward minus what was
  allocated before it; everywhere the bytes autograd saved (`SavedActivationCounter`, what the planner
  models);
- step time (CUDA), against the plan's time at its default 40% MFU, and the MFU measured here (CUDA:
  against the datasheet bf16 peak of `--gpu`; CPU: against the fp32 matmul rate measured now).

    .venv/bin/python bench/planner_accuracy.py                       # CPU, tiny shape, fp32
    python bench/planner_accuracy.py --device cuda --gpu H100 --config starcoderbase-1b --seq-length 4096
    ... -- --recompute-granularity full                              # any pretrain flag after --

A ratio near 1.0 means the planner's figure can be trusted for that term; > 1 means it underestimates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron.config import load_config
from megatron.config.gpus import PLANNER_GPU_MEMORY, gpu_peak_flops
from megatron.model.flops import flops_per_token
from megatron.model.memory import SavedActivationCounter
from megatron.parallel.state import ParallelState
from megatron.planner import layer_activation_bytes, plan
from megatron.training.builders import build_model, build_optimization
from megatron.training.step import micro_batch_loss_sum, train_step

TINY = [
    *("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"),
    *("--attention-head-type", "multiquery", "--seq-length", "128", "--max-position-embeddings", "128"),
    *("--vocab-size", "1024", "--fp32", "--attention-dropout", "0", "--hidden-dropout", "0", "--lr", "1e-3"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu: tiny shape, fp32)")
    parser.add_argument(
        "--config", default=None, help="preset, e.g. starcoderbase-1b (default: a tiny model)"
    )
    parser.add_argument(
        "--gpu", default="H100", choices=sorted(PLANNER_GPU_MEMORY), help="peak table entry for the plan"
    )
    parser.add_argument("--seq-length", type=int, default=None, help="override the preset's sequence length")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("extra", nargs="*", help="further megatron.pretrain flags (after --)")
    return parser.parse_args(argv)


def config_from(args):
    argv = ["--config", args.config] if args.config else list(TINY)
    if args.seq_length:
        argv += ["--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length)]
    mb = args.micro_batch_size
    argv += ["--micro-batch-size", str(mb), "--global-batch-size", str(mb * args.micro_batches)]
    argv += ["--train-iters", "100", "--lr-warmup-iters", "1", *args.extra]
    if args.device == "cpu" and args.config:
        argv += ["--fp32"]  # bf16 is ~300x slower than fp32 on CPUs
    return load_config(argv, world_size=1, check_paths=False)


def random_batches(cfg, device, count: int) -> list[dict]:
    b, s, v = cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, v, (b, s + 1), generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1].to(device),
                "labels": tokens[:, 1:].to(device),
                "loss_mask": torch.ones(b, s, device=device),
            }
        )
    return batches


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    cfg = config_from(args)
    planned = plan(cfg, args.gpu, mfu=0.4)
    stage = planned["stages"][0]
    state = ParallelState.single(device)
    state.seed(cfg.training.seed)
    model = build_model(cfg, cfg.model.vocab_size, state)
    optimizer, _, _ = build_optimization(cfg, model, state)
    batches = random_batches(cfg, device, args.micro_batches)
    for _ in range(2):  # warm-up: allocates the optimizer state and the caching allocator's blocks
        train_step(model, optimizer, batches, state)
    synchronize(device)

    print(
        f"planner accuracy on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}: {planned['params']:,} parameters, seq {cfg.model.seq_length}, micro-batch "
        f"{cfg.training.micro_batch_size} x {args.micro_batches}, {cfg.training.precision}, recompute "
        f"{cfg.model.recompute_granularity or 'none'}, flash {planned['flash']}"
    )
    rows = []
    static_planned = stage.weights + stage.grads + stage.optimizer
    if device.type == "cuda":
        static = torch.cuda.memory_allocated(device)
        rows.append(("static memory (weights, grads, optimizer)", static, static_planned))

    # activations of one micro-batch: what autograd saved, and (CUDA) the allocator's peak during forward
    model.train()
    batch = batches[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with SavedActivationCounter(exclude=list(model.parameters())) as counter:
        loss = micro_batch_loss_sum(model, batch)
    if device.type == "cuda":
        synchronize(device)
        rows.append(("activations, allocator peak in forward", torch.cuda.max_memory_allocated(device) - before,
                     stage.activations_per_micro_batch))  # fmt: skip
    # autograd saves only in the forward: under full recomputation the one layer re-run during backward
    # (which the plan adds as the working set) is not among them
    saved_planned = stage.activations_per_micro_batch
    if cfg.model.recompute_granularity == "full":
        m, tp = cfg.model, 1
        element = 4 if cfg.training.precision == "fp32" else 2
        saved_planned -= layer_activation_bytes(
            m,
            b=cfg.training.micro_batch_size,
            tp=tp,
            sp=False,
            element=element,
            recompute=None,
            flash=planned["flash"],
        )
    rows.append(("activations, saved by autograd in forward", counter.peak_bytes, saved_planned))
    loss.backward()
    optimizer.zero_grad()
    del loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, batches, state)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        # one stage without pipelining holds one micro-batch's activations at a time
        rows.append(("peak memory of a step", torch.cuda.max_memory_allocated(device), stage.total(False)))
    seconds = statistics.median(times)
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    flops = flops_per_token(cfg.model, cfg.model.vocab_size) * tokens
    if device.type == "cuda":
        peak = gpu_peak_flops(args.gpu, "bf16")
        # the plan's time assumes 40% MFU: the ratio says how far this device is from that assumption
        rows.append(("step time (s) vs the plan at 40% MFU", seconds, planned["iteration_seconds"]))
    else:
        from megatron.model.flops import device_peak_flops

        peak = device_peak_flops(device)[0]
    mfu = flops / (seconds * peak)
    width = max(len(name) for name, _, _ in rows)
    for name, measured, predicted in rows:
        unit = 1e9 if "memory" in name or "activations" in name else 1
        print(
            f"  {name:<{width}}  measured {measured / unit:10.3f}  planned {predicted / unit:10.3f}  "
            f"ratio {measured / predicted:.3f}"
        )
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
    print(f"  measured MFU {100 * mfu:.1f}% of {peak_text}; {tokens / seconds:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

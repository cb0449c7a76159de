"""Initialising one rank's shard: the counter-based generator, which draws only the local elements, against
the full-tensor draw it replaced (every rank drew each whole tensor with torch's CPU generator and kept
its slice), measured in the same run.

The rank is tensor-parallel rank 0 of pipeline stage 0 of a preset (default StarCoderBase 15.5B at
TP 4 x PP 4). Its model is built on the meta device, which gives every parameter's local shape, logical
shape and init method without allocating the stage. A few real tensors of the true local shapes (the
stage's biggest kinds: column- and row-parallel weights, the shared key/value projection) are then drawn
on the CPU, both ways: `megatron.model.init.init_parameter` for the new one, and for the old one
`torch.empty(full_shape).normal_(generator=...)` plus the copy of the slice. Each way's time per element
(CPU seconds of this process, so the numbers hold on a shared machine; wall seconds printed beside) is
multiplied by the elements it would draw for the whole stage: the local ones for the new way, the full
tensors for the old. The ratio old / new is the speed-up.

Usage: python bench/init.py [--config starcoderbase-15b] [--world-size 512] [--threads 1] [--repeats 3]
       [--quick]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import torch

from megatron.config.cli import load_config
from megatron.data.tokenizer import pad_vocab_size
from megatron.model import build_model
from megatron.model.init import init_parameter, local_shard, parameter_seed
from megatron.parallel.collectives import Group
from megatron.parallel.state import ParallelState

SAMPLES = ("attention.query.weight", "mlp.dense_4h_to_h.weight", "attention.key_value.weight")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="starcoderbase-15b", help="preset (default starcoderbase-15b)")
    parser.add_argument("--world-size", type=int, default=512, help="the preset's world size (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per tensor; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="time only the smaller sample tensors")
    return parser.parse_args(argv)


def stage_zero(config_name: str, world_size: int):
    """(config, the meta-device model of tensor-parallel rank 0 of pipeline stage 0)."""
    cfg = load_config(["--config", config_name], world_size=world_size, check_paths=False)
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    state = ParallelState(
        device=torch.device("cpu"),
        world_size=tp * pp,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=par.sequence_parallel,
        tp_group=Group(ranks=tuple(range(tp)), rank=0, kind="tp"),
    )
    vocab = pad_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    return cfg, build_model(cfg.model, vocab, state, par, device="meta")


def old_draw(param, seed: int, name: str) -> None:
    """The replaced init: the whole logical tensor from a torch.Generator, then this rank's slice."""
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    full = torch.empty(param.full_shape, dtype=torch.float32).normal_(
        0.0, param.init_std, generator=generator
    )
    param.copy_(local_shard(full, param, 0))


def fastest(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the fastest of `repeats` calls."""
    best = (math.inf, math.inf)
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        best = min(best, (time.process_time() - cpu, time.perf_counter() - wall))
    return best


def time_one(meta, name: str, seed: int, repeats: int, workspace: dict) -> tuple:
    """(name, local elements, full elements, new (cpu, wall) s, old (cpu, wall) s) for one tensor of the
    local shape of the meta parameter `meta`; `workspace` keeps the work buffers, as in init_weights."""
    param = torch.nn.Parameter(torch.empty(meta.shape), requires_grad=False)
    param.__dict__.update({k: v for k, v in meta.__dict__.items() if not k.startswith("_")})
    new = fastest(functools.partial(init_parameter, param, seed, name, workspace=workspace), repeats)
    std = param.std().item()
    if abs(std / meta.init_std - 1.0) > 0.01:
        raise SystemExit(f"{name}: std {std:.5f}, expected {meta.init_std:.5f}")
    old = fastest(functools.partial(old_draw, param, seed, name), repeats)
    return name, param.numel(), math.prod(meta.full_shape), new, old


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model = stage_zero(args.config, args.world_size)
    params = dict(model.named_parameters())
    normal = [p for p in params.values() if p.init_method == "normal"]
    local = sum(p.numel() for p in normal)
    full = sum(math.prod(p.full_shape) for p in normal)
    par = cfg.parallel
    print(
        f"{args.config}: TP {par.tensor_model_parallel_size} x PP {par.pipeline_model_parallel_size}, "
        f"stage 0 / TP rank 0: {local / 1e9:.3f}e9 normal parameters held, {full / 1e9:.3f}e9 in their "
        f"full tensors; torch threads {args.threads}"
    )
    samples = SAMPLES[2:] if args.quick else SAMPLES
    workspace, seed = {}, cfg.training.seed  # the work buffers, kept across tensors as init_weights does
    rows = [
        time_one(params[f"layers.0.{s}"], f"layers.0.{s}", seed, args.repeats, workspace) for s in samples
    ]
    new_cpu = sum(r[3][0] for r in rows) / sum(r[1] for r in rows)
    old_cpu = sum(r[4][0] for r in rows) / sum(r[2] for r in rows)
    new_wall = sum(r[3][1] for r in rows) / sum(r[1] for r in rows)
    old_wall = sum(r[4][1] for r in rows) / sum(r[2] for r in rows)
    for name, n_local, n_full, new, old in rows:
        print(
            f"  {name:40s} local {n_local / 1e6:7.1f}M (full {n_full / 1e6:7.1f}M): "
            f"local draw {new[0]:.3f} s cpu / {new[1]:.3f} s wall, full draw {old[0]:.3f} s cpu / {old[1]:.3f} s wall"
        )
    print(f"local draw: {new_cpu * 1e8:.2f} s per 1e8 local parameters (cpu; wall {new_wall * 1e8:.2f})")
    print(
        f"full draw (reference): {old_cpu * 1e8:.2f} s per 1e8 drawn parameters (cpu; wall {old_wall * 1e8:.2f})"
    )
    new_total, old_total = new_cpu * local, old_cpu * full
    print(f"projected stage 0 init: local draw {new_total:.1f} s, full draw {old_total:.1f} s (cpu seconds)")
    print(
        f"ratio full / local: {old_total / new_total:.2f}x (wall: {old_wall * full / (new_wall * local):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

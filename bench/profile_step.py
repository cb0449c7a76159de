"""Profile training steps: where a step's time goes, from torch.profiler, on the CPU or a GPU.

Builds the model and optimizer of a training config (any pretraining flags: a preset with `--config`,
overrides after it), runs `--warmup` untimed steps and then `--steps` steps of the real training step
(`megatron.training.step.train_step`: micro-batches, backward, gradient norm, AdamW, the step's one host
read) on random tokens under torch.profiler, and prints:

- the top operators by self time on the CPU, the top kernels by device time on a GPU;
- the share of GEMM, attention, elementwise / normalisation, communication, optimizer and other time;
- on a GPU, host reads per step (`aten::_local_scalar_dense`: item() and friends) and the synchronising
  CUDA runtime calls per step (the step's one read of its results is one);
- with `--trace FILE`, the Chrome trace (chrome://tracing or https://ui.perfetto.dev).

One process (tensor, pipeline and data-parallel size 1). `--vocab-size` defaults to StarCoder's 49152
(no tokenizer is read).

    .venv/bin/python bench/profile_step.py --config tiny-cpu --num-layers 2 --seq-length 128 \\
        --micro-batch-size 2 --global-batch-size 2 --vocab-size 2048
    python bench/profile_step.py --config starcoderbase-1b --micro-batch-size 1 --global-batch-size 1 \\
        --bf16 --torch-compile --trace /tmp/step.json          # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from megatron.config import load_config
from megatron.config._fields import ConfigError
from megatron.model import build_model
from megatron.parallel.state import ParallelState
from megatron.training.optimizer import PRECISION_DTYPES, build_optimizer
from megatron.training.step import train_step

STARCODER_VOCAB = 49152

# operator / kernel name fragments (lower case) -> category; the first match wins, in this order
CATEGORIES = (
    ("communication", ("nccl", "gloo", "c10d", "all_reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("optimizer", ("_foreach_", "fused_adam", "multi_tensor", "adamw")),
    (
        "attention",
        ("scaled_dot_product", "flash", "fmha", "sdpa", "cudnn_attention", "_efficient_attention", "softmax"),
    ),
    (
        "gemm",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "linear_pointwise",
            "gemm",
            "cutlass",
            "sm90_xmma",
            "sm80_xmma",
            "ampere_",
            "hopper_",
            "nvjet",
            "cublas",
            "aten::mv",
        ),
    ),
    (
        "elementwise",
        (
            "add",
            "mul",
            "div",
            "sub",
            "gelu",
            "dropout",
            "layer_norm",
            "copy",
            "fill",
            "zero",
            "where",
            "exp",
            "log",
            "sum",
            "mean",
            "norm",
            "cat",
            "elementwise",
            "vectorized",
            "reduce",
            "triton_",
            "cpp_fused",
            "bernoulli",
            "native_",
            "to_copy",
            "clamp",
            "masked",
            "pow",
            "sqrt",
            "neg",
        ),
    ),
)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--steps N] [--warmup N] [--top N] [--trace FILE] TRAINING FLAGS...",
    )
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; compiles)")
    parser.add_argument("--top", type=int, default=15, help="operators listed by self time (default 15)")
    parser.add_argument("--trace", default=None, help="write the Chrome trace of the profiled steps here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args, training_flags = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.top < 1:
        parser.error(
            f"--steps {args.steps} / --warmup {args.warmup} / --top {args.top}: need >= 1, >= 0, >= 1"
        )
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args, training_flags


def build(training_flags: list[str], device: str):
    """(config, model, optimizer, parallel state, micro-batches) for one process."""
    if "--vocab-size" not in training_flags:
        training_flags = [*training_flags, "--vocab-size", str(STARCODER_VOCAB)]
    try:
        cfg = load_config(training_flags, world_size=1, check_paths=False, prog="profile_step.py")
    except ConfigError as error:
        raise SystemExit(f"profile_step.py: error: {error}") from None
    state = ParallelState.single(device)
    model = build_model(cfg.model, cfg.model.vocab_size, state, cfg.parallel).to(state.device)
    model.init_weights(cfg.training.seed)
    model = model.to(PRECISION_DTYPES[cfg.training.precision])
    optimizer = build_optimizer(model, cfg.optimizer, parallel_state=state, parallel_config=cfg.parallel)
    micro = cfg.training.micro_batch_size
    num_micro_batches = cfg.training.global_batch_size // micro
    generator = torch.Generator().manual_seed(cfg.training.seed)
    shape = (micro, cfg.model.seq_length)
    batches = [
        {
            "tokens": torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(state.device),
            "labels": torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(state.device),
            "loss_mask": torch.ones(shape, device=state.device),
        }
        for _ in range(num_micro_batches)
    ]
    return cfg, model, optimizer, state, batches


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


# an operator inside one of these counts as its ancestor's kind (on the CPU, torch's foreach AdamW and
# attention kernels call per-tensor aten operators)
ENCLOSING = ("optimizer", "attention", "communication")


def _kind(event) -> str:
    """The kind of a profiler event: its outermost enclosing optimizer / attention / communication
    operator's, else its own."""
    kind, parent = category(event.name), event.cpu_parent
    while parent is not None:
        if category(parent.name) in ENCLOSING:
            kind = category(parent.name)
        parent = parent.cpu_parent
    return kind


def _timed(prof, on_device: bool) -> list[tuple[object, float]]:
    """(event, self time in us) of what the step's time is made of: the GPU's kernels, memcpys and
    memsets on a GPU (their host-side operators would count the same time twice), else the CPU
    operators."""
    if on_device:
        cuda = torch.autograd.DeviceType.CUDA
        return [(event, event.self_device_time_total) for event in prof.events() if event.device_type == cuda]
    return [(event, event.self_cpu_time_total) for event in prof.events()]


def summarize(prof, on_device: bool, steps: int, top: int) -> dict:
    """Top operators (kernels on a GPU), time shares per kind and host reads of a finished profile."""
    timed = [(event, time) for event, time in _timed(prof, on_device) if time > 0]
    total = sum(time for _, time in timed) or 1.0
    shares, times, calls = Counter(), Counter(), Counter()
    for event, time in timed:
        shares[_kind(event)] += time
        times[event.name] += time
        calls[event.name] += 1
    host_reads = device_syncs = 0
    for event in prof.events():
        if event.name == "aten::_local_scalar_dense" and _kind(event) != "optimizer":
            host_reads += 1
        device_syncs += event.name in SYNC_CALLS
    return {
        "total_us": total,
        "top": [(name, time, calls[name]) for name, time in times.most_common(top)],
        "shares": {label: shares[label] / total for label in [*(c for c, _ in CATEGORIES), "other"]},
        "host_reads_per_step": host_reads / steps,
        "device_syncs_per_step": device_syncs / steps,
    }


def report(summary: dict, on_device: bool, steps: int) -> None:
    where = "device" if on_device else "host (CPU)"
    print(f"\nself {where} time per step: {summary['total_us'] / steps / 1e3:.2f} ms over {steps} steps")
    print(f"\ntop {'kernels' if on_device else 'operators'} by self {where} time:")
    print(f"  {'share':>6}  {'ms/step':>9}  {'calls/step':>10}  name")
    for name, time, count in summary["top"]:
        share = time / summary["total_us"]
        print(f"  {share:6.1%}  {time / steps / 1e3:9.3f}  {count / steps:10.1f}  {name[:90]}")
    print("\ntime share by kind:")
    for label, share in summary["shares"].items():
        print(f"  {label:<14} {share:6.1%}")
    if on_device:
        reads = summary["host_reads_per_step"]
        print(f"\nhost reads per step (aten::_local_scalar_dense outside the optimizer): {reads:.1f}")
        print(f"synchronising CUDA calls per step: {summary['device_syncs_per_step']:.1f}")
    else:  # every tensor is a host tensor: nothing waits for a device
        print("\nhost syncs: none on the CPU (tests/unit/test_host_syncs.py counts the framework's reads)")


def main(argv: list[str] | None = None) -> dict:
    args, training_flags = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, optimizer, state, batches = build(training_flags, device)
    for _ in range(args.warmup):
        train_step(model, optimizer, batches, state)
    on_device = state.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            output = train_step(model, optimizer, batches, state)
        if on_device:
            torch.cuda.synchronize()
    m = cfg.model
    print(
        f"profile_step: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"({m.attention_head_type}), seq {m.seq_length}, micro-batch {cfg.training.micro_batch_size} x "
        f"{len(batches)}, {cfg.training.precision}, torch-compile {m.torch_compile}, {state.device}; "
        f"last loss {output.lm_loss:.4f}"
    )
    summary = summarize(prof, on_device, args.steps, args.top)
    report(summary, on_device, args.steps)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"\nChrome trace: {args.trace}")
    return summary


if __name__ == "__main__":
    main()

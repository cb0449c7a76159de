"""Benchmark: our training step against transformers' and Megatron-core's, side by side on one GPU.

One run, one device, the same shapes and the same synthetic batches (`bench/peers/step_timing.py`); each
peer runs in its own process (a clean peak-memory reading, and Megatron-core's package is also called
`megatron`, so it cannot share a process with ours). Per peer and shape it prints tokens/s, TFLOP/s and
MFU (one FLOP count for all peers: `megatron.model.flops_per_token`, against the datasheet dense bf16
peak of the GPU found by `torch.cuda.get_device_name`, or --peak-tflops), the peak memory
(`torch.cuda.max_memory_allocated` over the timed steps), the first-step loss, and the ratios of our
tokens/s to each peer's; then the `--dry-run` planner's memory for our run of the same shape against our
measured peak. Each peer: untimed warm-up steps (the first gives the first-step loss), then timed steps
each bracketed by CUDA events, the host waiting only after the last; the median step time counts.

Peers (dropout 0 for all; the same weight decay 0.1 except biases and LayerNorms, betas 0.9/0.95,
gradient clipping at 1.0):
- ours: `megatron.training.step.train_step` with the model and optimizer `megatron.pretrain` builds for
  the preset (--bf16: bf16 weights, fp32 gradient buffer and master weights, torch AdamW fused on CUDA);
  flags after `--` reach its config (and the plan), e.g. `-- --recompute-granularity selective`.
- transformers: GPTBigCodeForCausalLM, attn_implementation="sdpa", started from our initial weights, fp32
  weights under bf16 autocast (the Trainer's --bf16: fp32 weights are its master weights), torch AdamW
  fused. Its first-step loss matches ours (the same model).
- mcore-local / mcore-sdpa: Megatron-core's GPTModel with the local (non-Transformer-Engine) layer spec,
  one query group, its Float16Module + DistributedDataParallel + Float16Optimizer path
  (`bench/peers/mcore_peer.py`; falls back to torch AdamW over bf16 weights, said so, if that path
  fails), with its own DotProductAttention (selective recomputation of the attention core on CUDA, as
  Megatron runs unfused attention at long sequences) or with torch SDPA as its core attention. It runs
  with PYTHONPATH=--mcore-path (a directory holding megatron-core, e.g. `pip install --target DIR
  --no-deps megatron-core==0.16.1`) and without this repository; without --mcore-path it is skipped.

Shapes: `1b` = configs/starcoderbase-1b.yaml at seq 8192, micro-batch 1; `15b-layer` = the
configs/starcoderbase-15b.yaml layer (hidden 6144, 48 heads, multi-query, FFN 24576, seq 8192, vocab
49152) with TP = PP = 1, micro-batch 1 and --layers layers (default 6: the plan's 58 GB leaves an 80 GB GPU
room for the peers, whose layouts need more: transformers keeps fp32 weights and bf16 copies of them,
Megatron-core's own attention materialises the 48 x 8192 x 8192 scores of the layer it recomputes); `tiny` = a 2-layer fp32 model for CPUs (the test).

    python bench/gpu_train_step.py --shape 1b --shape 15b-layer --mcore-path /tmp/site --json out.json
    .venv/bin/python bench/gpu_train_step.py --device cpu --shape tiny --mcore-path /tmp/mcore_site
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peers.step_timing import device_description, emit_result, parse_result, synthetic_batches, time_steps

from megatron.config import ConfigError, load_config
from megatron.config.gpus import PLANNER_GPU_MEMORY
from megatron.model import flops_per_token
from megatron.model.flops import device_peak_flops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCORE_PEER = os.path.join(REPO_ROOT, "bench", "peers", "mcore_peer.py")
DEFAULT_15B_LAYERS = 6
_BATCH_1 = ["--micro-batch-size", "1", "--global-batch-size", "1"]
SHAPES = {
    "tiny": [
        *("--config", "tiny-cpu", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"),
        *("--seq-length", "64", "--max-position-embeddings", "64", "--vocab-size", "512", "--fp32"),
        *("--micro-batch-size", "2", "--global-batch-size", "2"),
    ],
    "1b": ["--config", "starcoderbase-1b", *_BATCH_1],
    "15b-layer": [
        *("--config", "starcoderbase-15b", "--num-layers", str(DEFAULT_15B_LAYERS), *_BATCH_1),
        *("--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"),
    ],
}
# the same for every shape and peer: no dropout, a run long enough for the scheduler's checks
COMMON = [
    "--attention-dropout",
    "0",
    "--hidden-dropout",
    "0",
    "--train-iters",
    "100",
    "--lr-warmup-iters",
    "1",
]
PEERS = ("ours", "transformers", "mcore-sdpa", "mcore-local")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--shape",
        action="append",
        choices=list(SHAPES),
        help="repeatable (default: 1b and 15b-layer on CUDA, tiny on CPU)",
    )
    add(
        "--layers",
        type=int,
        default=None,
        help=f"layers of the shape (default: the preset's; 15b-layer: {DEFAULT_15B_LAYERS})",
    )
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    add("--mcore-path", default=None, help="directory holding megatron-core (PYTHONPATH of its peer)")
    add("--warmup", type=int, default=None, help="untimed steps per peer (default 3 on CUDA, 1 on CPU)")
    add("--steps", type=int, default=None, help="timed steps per peer (default 10 on CUDA, 3 on CPU)")
    add("--seed", type=int, default=1234, help="seed of the weights and the synthetic batches")
    add(
        "--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s (default: the datasheet's)"
    )
    add("--worker-timeout", type=float, default=300, help="seconds each peer process may take")
    add("--json", default=None, help="also write the numbers to this JSON file")
    add("--worker", choices=["ours", "transformers"], default=None, help=argparse.SUPPRESS)
    add("ours_flags", nargs="*", help="megatron.pretrain flags for our run (after --)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    args.shape = args.shape or (["1b", "15b-layer"] if cuda else ["tiny"])
    if not cuda and set(args.shape) - {"tiny"}:
        parser.error(f"--shape {' '.join(args.shape)} on CPU: only --shape tiny runs on a CPU")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    args.peers = [peer.strip() for peer in args.peers.split(",") if peer.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown or "ours" not in args.peers:
        parser.error(
            f"--peers {','.join(args.peers)}: valid peers are {', '.join(PEERS)}, and ours is needed"
        )
    if args.mcore_path and not os.path.isdir(os.path.join(args.mcore_path, "megatron", "core")):
        parser.error(
            f"--mcore-path {args.mcore_path}: no megatron/core there (install megatron-core with --target)"
        )
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    for name in args.shape:
        try:
            shape_config(name, args)
        except ConfigError as error:
            parser.error(f"--shape {name}: {error}")
    return args


def shape_config(name: str, args):
    """Our run's validated Config for the shape (and --layers, and the flags after --)."""
    argv = [*SHAPES[name], *COMMON]
    if args.layers is not None:
        argv += ["--num-layers", str(args.layers)]
    return load_config([*argv, *args.ours_flags], world_size=1, check_paths=False)


# ----------------------------------------------------------------------------------------- workers


def ours_step(cfg, device):
    """Our training step as `megatron.pretrain` runs it (one process, TP = PP = DP = 1)."""
    from megatron.parallel.state import ParallelState
    from megatron.training.builders import build_model, build_optimization
    from megatron.training.step import train_step

    state = ParallelState.single(device)
    state.seed(cfg.training.seed)
    model = build_model(cfg, cfg.model.vocab_size, state)
    optimizer, _, _ = build_optimization(cfg, model, state)
    mask = torch.ones(cfg.training.micro_batch_size, cfg.model.seq_length, device=device)

    def step(tokens, labels):
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask}
        return train_step(model, optimizer, [batch], state).lm_loss

    adam = "fused" if optimizer.optimizer.defaults.get("fused") else "foreach"
    masters = "fp32 master weights" if cfg.training.precision != "fp32" else "no masters"
    note = (
        f"train_step, {cfg.training.precision} weights, fp32 gradient buffer, {masters}, torch AdamW ({adam})"
    )
    return step, note, sum(p.numel() for p in model.parameters())


def transformers_step(cfg, device):
    """GPTBigCodeForCausalLM (sdpa) from our initial weights, fp32 weights, bf16 autocast for --bf16."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    from megatron.checkpoint.gpt_bigcode import gpt_bigcode_config_kwargs, to_gpt_bigcode_state_dict
    from megatron.model import build_model as build_gpt
    from megatron.parallel.state import ParallelState

    vocab = cfg.model.vocab_size
    source = build_gpt(cfg.model, vocab, ParallelState.single(device), cfg.parallel, device=device)
    source.init_weights(cfg.training.seed)  # the same values ours starts from (before its cast to bf16)
    state = to_gpt_bigcode_state_dict(source.state_dict(), cfg.model)
    with torch.device(device):
        hf = GPTBigCodeForCausalLM(
            GPTBigCodeConfig(**gpt_bigcode_config_kwargs(cfg.model, vocab, attn_implementation="sdpa"))
        )
    hf.load_state_dict(state, strict=False)
    del source, state
    hf.train()
    decay = [p for p in hf.parameters() if p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    opt = cfg.optimizer
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                                  fused=fused or None, foreach=not fused)  # fmt: skip
    bf16 = cfg.training.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(tokens, labels):
        with autocast:
            loss = hf(input_ids=tokens, labels=tokens, shift_labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), opt.clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    import transformers

    precision = "fp32 weights under bf16 autocast" if bf16 else f"{cfg.training.precision} weights"
    note = f"transformers {transformers.__version__}, sdpa, {precision}, torch AdamW ({'fused' if fused else 'foreach'})"
    return step, note, sum(p.numel() for p in hf.parameters())


def worker_main(args) -> int:
    """One peer (ours or transformers) for one shape, in this process: prints its RESULT line."""
    import megatron

    if os.path.dirname(os.path.dirname(os.path.abspath(megatron.__file__))) != REPO_ROOT:
        raise SystemExit(f"gpu_train_step.py: imported megatron from {megatron.__file__}, not {REPO_ROOT}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = shape_config(args.shape[0], args)
    make = ours_step if args.worker == "ours" else transformers_step
    step, note, params = make(cfg, device)
    m, t = cfg.model, cfg.training
    batches = synthetic_batches(args.seed, t.micro_batch_size, m.seq_length, m.vocab_size, device)
    result = time_steps(step, batches, warmup=args.warmup, steps=args.steps, device=device)
    result.update(peer=args.worker, device=device_description(device), parameters=params, notes=note)
    emit_result(result)
    return 0


# ---------------------------------------------------------------------------------------- the parent


def _python_path(first: str | None, drop: tuple[str, ...]) -> str:
    """PYTHONPATH with `first` in front and the entries under `drop` left out."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    keep = [p for p in keep if not any(os.path.abspath(p).startswith(os.path.abspath(d)) for d in drop if d)]
    return os.pathsep.join(([first] if first else []) + keep)


def peer_command(peer: str, name: str, cfg, args, step_mode: str | None, init_file: str | None):
    """(argv, PYTHONPATH) of the process that runs `peer` on shape `name`."""
    common = [
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
    ]
    if peer in ("ours", "transformers"):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--shape", name, *common]
        if args.layers is not None:
            argv += ["--layers", str(args.layers)]
        return [*argv, "--", *args.ours_flags], _python_path(REPO_ROOT, (args.mcore_path,))
    m, t, o = cfg.model, cfg.training, cfg.optimizer
    argv = [sys.executable, MCORE_PEER, *common, "--attention", peer.removeprefix("mcore-")]
    shape = {"num-layers": m.num_layers, "hidden-size": m.hidden_size, "num-attention-heads": m.num_attention_heads,
             "ffn-hidden-size": m.ffn_hidden_size, "seq-length": m.seq_length, "vocab-size": m.vocab_size,
             "micro-batch-size": t.micro_batch_size, "init-method-std": m.init_method_std,
             "layernorm-epsilon": m.layernorm_epsilon, "lr": o.lr, "weight-decay": o.weight_decay,
             "clip-grad": o.clip_grad, "dtype": "fp32" if t.precision == "fp32" else "bf16"}  # fmt: skip
    for key, value in shape.items():
        argv += [f"--{key}", str(value)]
    if step_mode:
        argv += ["--step", step_mode]
    if peer == "mcore-local" and torch.device(args.device).type == "cuda":
        argv.append("--recompute")
    if init_file:
        argv += ["--init-from", init_file]
    return argv, _python_path(args.mcore_path, (REPO_ROOT,))


def run_peer(peer: str, name: str, cfg, args, init_file: str | None) -> dict:
    """The peer's result dict, or {"error": ...}. Megatron-core's own training path is tried first on
    CUDA; if it fails, the peer runs again with --step plain (the result says so)."""
    if peer.startswith("mcore") and not args.mcore_path:
        return {"error": "skipped: no --mcore-path (a directory holding megatron-core)"}
    cuda = torch.device(args.device).type == "cuda"
    modes = ["megatron", "plain"] if peer.startswith("mcore") and cuda else [None]
    errors = []
    for mode in modes:
        argv, python_path = peer_command(peer, name, cfg, args, mode, init_file)
        env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"{mode or peer}: no result within --worker-timeout {args.worker_timeout:g} s")
            continue
        result = parse_result(done.stdout)
        if done.returncode == 0 and result is not None:
            if errors:
                result["notes"] += f" (fallback; before it: {' | '.join(errors)})"
            return result
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-3:]
        errors.append(f"{mode or peer}: exit {done.returncode}: {' / '.join(tail)}")
    return {"error": " | ".join(errors)}


def write_init_file(cfg, directory: str) -> str:
    """Our initial weights under GPT-BigCode names (the Megatron-core peer maps them): small shapes only."""
    from megatron.checkpoint.gpt_bigcode import to_gpt_bigcode_state_dict
    from megatron.model import build_model as build_gpt

    model = build_gpt(cfg.model, cfg.model.vocab_size)
    model.init_weights(cfg.training.seed)
    path = os.path.join(directory, "init.pt")
    torch.save(to_gpt_bigcode_state_dict(model.state_dict(), cfg.model), path)
    return path


def planner_gpu(device) -> str | None:
    """The planner's GPU entry for this device (None on a CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gpu for gpu in PLANNER_GPU_MEMORY if gpu in name), None)


def bench_shape(name: str, args, peak: float, progress) -> dict:
    """Every peer on shape `name`; `progress(summary)` after each (the partial numbers survive a kill)."""
    from megatron.planner import plan

    cfg = shape_config(name, args)
    m, t = cfg.model, cfg.training
    tokens = t.micro_batch_size * m.seq_length
    fpt = flops_per_token(m, m.vocab_size)
    print(
        f"\n[{name}] layers={m.num_layers} hidden={m.hidden_size} heads={m.num_attention_heads} "
        f"({m.attention_head_type}) ffn={m.ffn_hidden_size} seq={m.seq_length} vocab={m.vocab_size} "
        f"micro-batch={t.micro_batch_size}, {t.precision}; FLOP/token {fpt:.6g} (all peers)",
        flush=True,
    )
    print("| peer | tokens/s | TFLOP/s | MFU | peak GiB | first-step loss | FLOP/token |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    results = {}
    summary = {"shape": name, "flops_per_token": fpt, "tokens_per_step": tokens, "peers": results}
    with tempfile.TemporaryDirectory() as scratch:
        init_file = write_init_file(cfg, scratch) if name == "tiny" and args.mcore_path else None
        for peer in args.peers:
            result = run_peer(peer, name, cfg, args, init_file)
            if "error" not in result:
                rate = tokens / result["median_step_seconds"]
                result.update(
                    tokens_per_sec=rate, tflops=rate * fpt / 1e12, mfu=rate * fpt / peak if peak else None
                )
            results[peer] = result
            print(_row(peer, result, fpt), flush=True)
            summary["ratios"] = _ratios(results)
            progress(summary)
    for peer in results:
        print(f"  {peer}: {results[peer].get('notes') or results[peer].get('error')}")
    for key, value in summary["ratios"].items():
        print(f"  ratio {key}: {value:.3f} (tokens/s)")
    gpu = planner_gpu(torch.device(args.device))
    measured = results["ours"].get("peak_memory_bytes")
    if gpu and measured:
        stage = plan(cfg, gpu)["stages"][0]
        planned = stage.total(cfg.parallel.use_distributed_optimizer)
        ratio = measured / planned
        summary["planner"] = {
            "gpu": gpu,
            "planned_bytes": planned,
            "measured_bytes": measured,
            "ratio": ratio,
        }
        verdict = "within 5%" if abs(ratio - 1) <= 0.05 else "NOT within 5%"
        print(
            f"  planner ({gpu}): planned {planned / 2**30:.2f} GiB, measured peak (ours) {measured / 2**30:.2f} GiB, measured/planned {ratio:.3f} ({verdict})"
        )
    return summary


def _row(peer: str, result: dict, fpt: float) -> str:
    if "error" in result:
        return f"| {peer} | - | - | - | - | - | {fpt:.6g} |"
    mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "n/a"
    peak = result.get("peak_memory_bytes")
    peak_text = f"{peak / 2**30:.2f}" if peak else "n/a"
    return (f"| {peer} | {result['tokens_per_sec']:.1f} | {result['tflops']:.4g} | {mfu} | {peak_text} | "
            f"{result['first_loss']:.5f} | {fpt:.6g} |")  # fmt: skip


def _ratios(results: dict) -> dict:
    ours = results["ours"].get("tokens_per_sec")
    return {
        f"ours/{peer}": ours / result["tokens_per_sec"]
        for peer, result in results.items()
        if peer != "ours" and ours and result.get("tokens_per_sec")
    }


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(args)
    device = torch.device(args.device)
    dtype = torch.float32 if args.shape == ["tiny"] else torch.bfloat16
    peak, peak_desc = device_peak_flops(device, dtype, peak_tflops=args.peak_tflops)
    print(
        f"torch {torch.__version__}, {device_description(device)}; peak {peak / 1e12:.4g} TFLOP/s ({peak_desc})"
    )
    print(f"warm-up {args.warmup} steps, then {args.steps} timed steps per peer (median); dropout 0")
    summaries = []

    def save(summary: dict) -> None:
        if not args.json:
            return
        shapes = [s for s in summaries if s is not summary] + [summary]
        numbers = {"device": device_description(device), "torch": torch.__version__, "peak_flops": peak,
                   "peak": peak_desc, "shapes": shapes}  # fmt: skip
        with open(args.json, "w") as file:
            json.dump(numbers, file, indent=1)

    for name in args.shape:
        summaries.append(bench_shape(name, args, peak, save))
        save(summaries[-1])  # with the planner's figures
    return 0


if __name__ == "__main__":
    sys.exit(main())

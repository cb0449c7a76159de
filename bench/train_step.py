"""Benchmark: our training step against Hugging Face transformers' GPTBigCodeForCausalLM.

One step = forward, per-token cross-entropy over all tokens (mean), backward, AdamW step, zero_grad.
Both models have the same shape (multi-query attention, tied embeddings, tanh GELU, dropout 0), start from
the same weights (ours are copied into the HF model; the first-step losses are printed side by side),
see the same batches, and use the same optimizer (torch AdamW, fused where supported, weight decay 0.1
except biases and LayerNorm: the HF Trainer's default optimizer). HF gets `attn_implementation="sdpa"`
and its own loss with `shift_labels`, so both average the loss over the same s tokens per sequence.
Steps of the two alternate in rounds within one process (so load from other processes hits both);
the median step time of each gives tokens/s (the ratio of the fastest steps is printed too: on a shared
machine it is the less disturbed estimate). MFU uses `flops_per_token` (6N + 12*L*s*h, the same count
for both) against the device peak: on CPU the best fp32 matmul rate measured in this run (before, between
and after the shapes). On Linux the process's malloc is told to keep freed memory (`--no-malloc-tuning`
to skip): otherwise large activation buffers go back to the kernel every step and come back as page
faults inside whichever model's ops happen to allocate them. It applies to both models alike.

    .venv/bin/python bench/train_step.py                # both shapes, 2 threads, CPU fp32
    .venv/bin/python bench/train_step.py --quick --shape small
    .venv/bin/python bench/train_step.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch

from megatron.checkpoint.gpt_bigcode import gpt_bigcode_config_kwargs, to_gpt_bigcode_state_dict
from megatron.config import ModelConfig
from megatron.model import GPTModel, device_peak_flops, flops_per_token
from megatron.model.flops import _measured_cpu_peak

# name: (num_layers, hidden_size, num_attention_heads, seq_length, vocab_size, micro_batch_size)
SHAPES = {
    "small": (4, 512, 8, 512, 8192, 4),
    "base": (12, 768, 12, 1024, 49152, 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all", help="model shape (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step, 1 warm-up (noisier)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of alternating steps (default 6; 3 with --quick)"
    )
    parser.add_argument("--steps-per-round", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp32 or autocast bf16/fp16")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc's trim/mmap thresholds as they are",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 6
    if args.quick:
        args.steps_per_round, args.warmup = 1, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.device == "cpu" and args.dtype != "fp32":
        parser.error(f"--dtype {args.dtype} on CPU is far slower than fp32 here; use --dtype fp32 on CPU")
    return args


def model_config(shape, device) -> ModelConfig:
    layers, hidden, heads, seq, _, _ = shape
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_head_type="multiquery",
        seq_length=seq,
        max_position_embeddings=seq,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_flash_attn=torch.device(device).type == "cuda",
    )


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no trimming, no mmap for blocks under 1 GiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 2**30))


def cpu_peak() -> float:
    """A fresh measurement of the CPU fp32 matmul rate (uncached)."""
    return _measured_cpu_peak.__wrapped__(torch.get_num_threads())


def build_hf(config: ModelConfig, vocab_size: int, ours: GPTModel, device):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    kwargs = gpt_bigcode_config_kwargs(config, vocab_size, attn_implementation="sdpa")
    hf = GPTBigCodeForCausalLM(GPTBigCodeConfig(**kwargs))
    state = {name: tensor.detach().clone() for name, tensor in ours.state_dict().items()}
    hf.load_state_dict(to_gpt_bigcode_state_dict(state, config), strict=False)
    return hf.to(device).train()


def make_optimizer(params_and_flags, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param, skip_decay in params_and_flags:
        (no_decay if skip_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):  # fused not available for this device/torch
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True)


def make_steps(ours, hf, args):
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    opt_ours = make_optimizer(((p, getattr(p, "no_weight_decay", False)) for p in ours.parameters()), device)
    opt_hf = make_optimizer(((p, p.ndim < 2) for p in hf.parameters()), device)

    def step_ours(tokens, labels):
        with autocast:
            loss = ours(tokens, labels=labels).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_hf(tokens, labels):
        with autocast:
            loss = hf(input_ids=tokens, labels=tokens, shift_labels=labels).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss

    return step_ours, step_hf


def timed(step, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_shape(name: str, args) -> dict:
    shape = SHAPES[name]
    _, _, _, seq, vocab, batch = shape
    device = torch.device(args.device)
    config = model_config(shape, device)
    ours = GPTModel(config, vocab)
    ours.init_weights(args.seed)
    hf = build_hf(config, vocab, ours, device)
    ours = ours.to(device).train()
    generator = torch.Generator().manual_seed(args.seed)
    samples = torch.randint(0, vocab, (4, batch, seq + 1), generator=generator).to(device)
    batches = [(sample[:, :-1].contiguous(), sample[:, 1:].contiguous()) for sample in samples]
    step_ours, step_hf = make_steps(ours, hf, args)
    first = (step_ours(*batches[0]).item(), step_hf(*batches[0]).item())
    for i in range(1, args.warmup):
        step_ours(*batches[i % 4])
        step_hf(*batches[i % 4])
    times = {"ours": [], "hf": []}
    for r in range(args.rounds):
        order = [("ours", step_ours), ("hf", step_hf)]
        for label, step in order if r % 2 == 0 else order[::-1]:
            for i in range(args.steps_per_round):
                times[label].append(timed(step, batches[(r + i) % 4], device))
    tokens = batch * seq
    return {
        "name": name,
        "shape": shape,
        "first_loss": first,
        "tokens_per_sec": {k: tokens / statistics.median(v) for k, v in times.items()},
        "best_tokens_per_sec": {k: tokens / min(v) for k, v in times.items()},
        "flops_per_token": flops_per_token(config, vocab),
    }


def report(result: dict, peak: float) -> None:
    layers, hidden, heads, seq, vocab, batch = result["shape"]
    ours, hf = result["tokens_per_sec"]["ours"], result["tokens_per_sec"]["hf"]
    fpt = result["flops_per_token"]
    print(
        f"[{result['name']}] layers={layers} hidden={hidden} heads={heads} (MQA) seq={seq} vocab={vocab} "
        f"batch={batch}; first-step loss ours {result['first_loss'][0]:.5f} hf {result['first_loss'][1]:.5f}"
    )
    for label, rate in (("ours", ours), ("transformers", hf)):
        gflops = rate * fpt / 1e9
        mfu = f"{100 * rate * fpt / peak:.1f}%" if peak > 0 else "n/a"
        print(f"  {label:13s} {rate:9.1f} tokens/s  {gflops:8.1f} GFLOP/s  MFU {mfu}")
    best = result["best_tokens_per_sec"]
    print(
        f"  ratio ours/transformers: {ours / hf:.3f} (medians; fastest steps: {best['ours'] / best['hf']:.3f})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tuned = device.type == "cpu" and not args.no_malloc_tuning and tune_malloc()
    peak, peak_desc = device_peak_flops(device, dtype)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    results = []
    for name in names:
        results.append(bench_shape(name, args))
        if device.type == "cpu":  # re-measured after each shape; the best (least disturbed) is the peak
            peak = max(peak, cpu_peak())
    malloc = ", malloc tuned" if tuned else ""
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, {args.dtype}{malloc}")
    print(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_desc})")
    for result in results:
        report(result, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: our KV-cache generation against Hugging Face transformers' `generate` on the same weights.

One GPTModel (StarCoder-style, multi-query by default) with random weights; the same weights loaded into
`GPTBigCodeForCausalLM` (megatron/checkpoint/gpt_bigcode.py's mapping, SDPA attention). Both generate
greedily from the same left-padded batch of prompts, the same number of new tokens (no early stop), on
the same threads, alternating rounds; tokens/s = batch * new tokens / wall time (prefill included).
The generated ids are compared too.

    .venv/bin/python bench/generate.py            # hidden 768, 6 layers, batch 4, 128 new tokens
    .venv/bin/python bench/generate.py --threads 1 --attention-head-type multihead
    .venv/bin/python bench/generate.py --quick    # hidden 256, 4 layers, batch 2, 48 new tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron.checkpoint.gpt_bigcode import gpt_bigcode_config_kwargs, to_gpt_bigcode_state_dict
from megatron.config import ModelConfig
from megatron.inference.generate import generate_tokens, left_pad
from megatron.model import GPTModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens (a smoke run)")
    parser.add_argument("--hidden-size", type=int, default=None, help="default 768 (256 with --quick)")
    parser.add_argument("--num-layers", type=int, default=None, help="default 6 (4 with --quick)")
    parser.add_argument("--num-attention-heads", type=int, default=None, help="default 12 (4 with --quick)")
    parser.add_argument(
        "--attention-head-type", choices=("multiquery", "multihead"), default="multiquery", help="MQA or MHA"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary (output layer rows)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 4; 2 quick)")
    parser.add_argument(
        "--prompt-length", type=int, default=64, help="longest prompt; others shorter (padded)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (48 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; 2 quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    return parser


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    for name, full, small in (
        ("hidden_size", 768, 256),
        ("num_layers", 6, 4),
        ("num_attention_heads", 12, 4),
        ("batch_size", 4, 2),
        ("max_new_tokens", 128, 48),
        ("rounds", 5, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)


def build_models(args: argparse.Namespace):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    positions = args.prompt_length + args.max_new_tokens
    config = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        attention_head_type=args.attention_head_type,
        seq_length=positions,
        max_position_embeddings=positions,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    ours = GPTModel(config, args.vocab_size)
    ours.init_weights(1234)
    ours = ours.to(args.device).eval()
    kwargs = gpt_bigcode_config_kwargs(config, args.vocab_size, attn_implementation="sdpa")
    hf = GPTBigCodeForCausalLM(GPTBigCodeConfig(**kwargs))
    state = {name: tensor.detach().clone() for name, tensor in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(to_gpt_bigcode_state_dict(state, config), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return ours, hf.to(args.device).eval()


def make_prompts(args: argparse.Namespace) -> list[list[int]]:
    """Prompts of decreasing length (the batch is left-padded), ids from a fixed generator."""
    generator = torch.Generator().manual_seed(0)
    lengths = [max(1, args.prompt_length - 9 * row) for row in range(args.batch_size)]
    return [torch.randint(1, args.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def run_ours(model, prompts, args) -> list[list[int]]:
    return generate_tokens(model, prompts, args.max_new_tokens)


def run_hf(model, prompts, args) -> list[list[int]]:
    from transformers import GenerationConfig

    tokens, mask, _ = left_pad(prompts, 0)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        out = model.generate(
            tokens.to(args.device), attention_mask=mask.long().to(args.device), generation_config=config
        )
    return out[:, tokens.shape[1] :].tolist()


def _timed(function, *call_args, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*call_args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _defaults(args)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.prompt_length < 1:
        print(
            "generate bench: error: --batch-size, --max-new-tokens, --prompt-length must be >= 1",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, hf = build_models(args)
    prompts = make_prompts(args)
    # warm-up (allocator, oneDNN primitive caches, transformers' lazy imports)
    ids_ours, ids_hf = run_ours(ours, prompts, args), run_hf(hf, prompts, args)
    times = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        times["ours"].append(_timed(run_ours, ours, prompts, args, device=args.device)[0])
        times["transformers"].append(_timed(run_hf, hf, prompts, args, device=args.device)[0])
    tokens = args.batch_size * args.max_new_tokens
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    print(
        f"model: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_attention_heads} heads "
        f"({args.attention_head_type}), vocab {args.vocab_size}; device {args.device} fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"batch {args.batch_size} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
        f"(left-padded), {args.max_new_tokens} new tokens each, greedy; {args.rounds} rounds, medians"
    )
    for name, rate in rates.items():
        print(
            f"  {name:>12}: {rate:9.1f} tokens/s  ({statistics.median(times[name]) * 1e3:.0f} ms per batch)"
        )
    fastest = {name: min(values) for name, values in times.items()}
    print(
        f"  ratio ours/transformers: {rates['ours'] / rates['transformers']:.3f} "
        f"(medians; fastest rounds: {fastest['transformers'] / fastest['ours']:.3f})"
    )
    same = sum(a == b for a, b in zip(ids_ours, ids_hf))
    print(f"  identical generated ids: {same}/{len(prompts)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Megatron-core's GPTModel training step, one process: the Megatron-core peer of bench/gpu_train_step.py.

Megatron-core (the `megatron-core` wheel) and this framework are both imported as `megatron`, so this
script runs in its own process with a PYTHONPATH that holds megatron-core and not this repository;
bench/gpu_train_step.py starts it so (--mcore-path). It builds GPTModel with the local, non-Transformer-
Engine layer spec (`get_gpt_layer_local_spec`): learned absolute positions, tied embeddings, one query
group (multi-query attention), tanh GELU, biases, dropout 0; one GPU, world size 1.

--step megatron (CUDA): Megatron-core's own training path: Float16Module (bf16 weights), its
DistributedDataParallel (fp32 gradient buffer), get_megatron_optimizer (bf16 -> Float16Optimizer, fp32
master weights; Adam is Transformer Engine's or Apex's FusedAdam when installed, else torch.optim.AdamW,
as the wheel chooses), the no-pipelining schedule of `get_forward_backward_func`. --step plain: the
model's forward and backward and torch AdamW over its own weights (fused on CUDA); the only path on a
CPU, where Megatron-core's schedule and optimizer allocate on "cuda" unconditionally.
--attention local: Megatron-core's DotProductAttention (scores materialised; at long sequences it needs
--recompute, Megatron's selective recomputation of the attention core, to fit). --attention sdpa: the
same model with its core attention replaced by torch's scaled_dot_product_attention (flash on GPUs), the
best Megatron-core can do without Transformer Engine.

    PYTHONPATH=/tmp/site python bench/peers/mcore_peer.py --device cpu --dtype fp32   # tiny defaults
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from step_timing import device_description, emit_result, synthetic_batches, time_steps

# torch >= 2.5: scaled_dot_product_attention(..., enable_gqa=True)
GQA_SDPA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--num-layers", type=int, default=2)
    add("--hidden-size", type=int, default=64)
    add("--num-attention-heads", type=int, default=4)
    add("--ffn-hidden-size", type=int, default=256)
    add("--seq-length", type=int, default=64)
    add("--vocab-size", type=int, default=512)
    add("--micro-batch-size", type=int, default=2)
    add("--init-method-std", type=float, default=0.02)
    add("--layernorm-epsilon", type=float, default=1e-5)
    add("--lr", type=float, default=1e-4)
    add("--weight-decay", type=float, default=0.1)
    add("--clip-grad", type=float, default=1.0)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    add("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    add("--attention", choices=["local", "sdpa"], default="local", help="core attention (see above)")
    add("--recompute", action="store_true", help="selective recomputation of the attention core")
    add("--step", choices=["megatron", "plain"], default=None, help="default: megatron on CUDA, plain on CPU")
    add("--warmup", type=int, default=1, help="untimed steps (the first gives the first-step loss)")
    add("--steps", type=int, default=3, help="timed steps")
    add("--seed", type=int, default=1234, help="seed of the synthetic batches and of the init")
    add(
        "--init-from", default=None, help="a GPT-BigCode (transformers) state dict (torch.save) to start from"
    )
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.step = args.step or ("megatron" if cuda else "plain")
    if not cuda and args.step == "megatron":
        parser.error("--step megatron needs CUDA (Megatron-core's schedule and optimizer allocate on 'cuda')")
    if not cuda and args.recompute:
        parser.error("--recompute needs CUDA (Megatron-core's recomputation saves the CUDA RNG state)")
    if not cuda and args.dtype != "fp32":
        parser.error(f"--dtype {args.dtype} on CPU: use fp32")
    return args


def megatron_core_problem() -> str | None:
    """None when `megatron.core` is Megatron-core's; else what was imported instead and how to fix it."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as error:
        try:
            import megatron

            where = list(getattr(megatron, "__path__", []))
        except ImportError:
            where = []
        if where:
            return (
                f"`megatron` was imported from {where}, which has no `megatron.core`: this repository's "
                "package has the same name. Run this peer with PYTHONPATH set to a directory holding "
                "megatron-core (`pip install --target DIR --no-deps megatron-core`) and without this "
                f"repository ({REPO_ROOT}) on the path"
            )
        return f"megatron-core is not installed ({error}): `pip install --target DIR --no-deps megatron-core`"
    return None


def allow_cpu() -> None:
    """Megatron-core's forward allocates a few tensors on "cuda" unconditionally; on a CPU-only torch,
    point them at the CPU. The forward and backward computations are unchanged (dropout is 0 here, so the
    model-parallel RNG tracker that is skipped draws nothing)."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.utils as core_utils
    from megatron.core.tensor_parallel import random as core_random

    def cpu_buffer(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    core_utils.GlobalMemoryBuffer.get_tensor = cpu_buffer
    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)
    core_random.CudaRNGStatesTracker.fork = lambda self, name="model-parallel-rng": contextlib.nullcontext()


class SDPACoreAttention(torch.nn.Module):
    """Drop-in core attention for Megatron-core's SelfAttention: causal torch SDPA over [s, b, heads, d]
    query and [s, b, 1, d] key/value (multi-query: K/V broadcast without a copy, through enable_gqa in
    16-bit on CUDA as our model does there)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **_):
        super().__init__()
        self.dropout = config.attention_dropout
        self.hidden_size = config.kv_channels * config.num_attention_heads

    def forward(self, query, key, value, attention_mask, **_):
        sq, b, heads, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = key.permute(1, 2, 0, 3)  # [b, groups, s, d]
        v = value.permute(1, 2, 0, 3)
        dropout = self.dropout if self.training else 0.0
        gqa = {}
        if k.shape[1] != heads and GQA_SDPA and q.is_cuda and q.dtype != torch.float32:
            gqa = {"enable_gqa": True}  # flash / cuDNN read the one K/V head for every query head
        elif k.shape[1] != heads:
            k, v = k.expand(b, heads, *k.shape[2:]), v.expand(b, heads, *v.shape[2:])
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, **gqa
        )  # [b, heads, s, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size)


def init_parallel(device) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)


def transformer_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.device(args.device).type == "cuda"
    bf16 = args.dtype == "bf16"
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=1,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.hidden_size // args.num_attention_heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=args.layernorm_epsilon,
        init_method_std=args.init_method_std,
        add_bias_linear=True,
        gated_linear_unit=False,
        # on CUDA Megatron-core's fused bias-GELU (which computes the tanh approximation); it requires
        # activation_func to be F.gelu. Unfused (CPU) the tanh GELU is asked for directly.
        activation_func=F.gelu if cuda else (lambda x: F.gelu(x, approximate="tanh")),
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,  # needs Apex's fused_weight_gradient_mlp_cuda
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not cuda,
        recompute_granularity="selective" if args.recompute else None,
    )


def build_model(args, config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(args.seed)
    if torch.device(args.device).type == "cuda":
        model_parallel_cuda_manual_seed(args.seed)
    spec = get_gpt_layer_local_spec()
    if args.attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(
        config,
        transformer_layer_spec=spec,
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
    )
    if args.init_from:
        load_gpt_bigcode_weights(
            model, torch.load(args.init_from, map_location="cpu", weights_only=True), args.num_layers
        )
    return model.to(args.device)


def gpt_bigcode_names(num_layers: int) -> dict[str, str]:
    """Megatron-core GPTModel (local spec, one query group) parameter name -> GPT-BigCode name. The fused
    QKV rows are [queries of all heads, key, value] in both."""
    names = {
        "embedding.word_embeddings.weight": "transformer.wte.weight",
        "embedding.position_embeddings.weight": "transformer.wpe.weight",
        "decoder.final_layernorm.weight": "transformer.ln_f.weight",
        "decoder.final_layernorm.bias": "transformer.ln_f.bias",
    }
    per_layer = {
        "input_layernorm": "ln_1",
        "self_attention.linear_qkv": "attn.c_attn",
        "self_attention.linear_proj": "attn.c_proj",
        "pre_mlp_layernorm": "ln_2",
        "mlp.linear_fc1": "mlp.c_fc",
        "mlp.linear_fc2": "mlp.c_proj",
    }
    for layer in range(num_layers):
        for ours, theirs in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"decoder.layers.{layer}.{ours}.{kind}"] = f"transformer.h.{layer}.{theirs}.{kind}"
    return names


def load_gpt_bigcode_weights(model, state: dict, num_layers: int) -> None:
    names = gpt_bigcode_names(num_layers)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(names))
    if missing:
        raise ValueError(f"no GPT-BigCode name for Megatron-core parameters {missing}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[names[name]])


def megatron_step(args, model, config):
    """Megatron-core's own path: Float16Module, DDP gradient buffer, Float16Optimizer, the schedule."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    if args.dtype == "bf16":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=args.clip_grad, bf16=args.dtype == "bf16", use_distributed_optimizer=False,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    config.finalize_model_grads_func = finalize_model_grads
    forward_backward = get_forward_backward_func()
    b, s = args.micro_batch_size, args.seq_length
    positions = torch.arange(s, device=args.device).expand(b, s)

    def forward_step(data_iterator, module):
        tokens, labels = next(data_iterator)
        token_losses = module(tokens, positions, None, labels=labels)  # [b, s]

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return token_losses, loss_func

    def step(tokens, labels):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=iter([(tokens, labels)]), model=[model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False,
        )  # fmt: skip
        optimizer.step()
        return losses[0]["lm loss"]

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    names = "+".join(sorted({type(o).__name__ for o in inner}))
    wrapper = "Float16Module + " if args.dtype == "bf16" else ""
    return step, f"{wrapper}DDP fp32 gradient buffer + {names} ({_adam_name()}), the no-pipelining schedule"


def _adam_name() -> str:
    import megatron.core.optimizer as core_optimizer

    return "torch.optim.AdamW" if getattr(core_optimizer, "USING_PYTORCH_OPTIMIZER", True) else "fused Adam"


def plain_step(args, model):
    """Forward, backward and torch AdamW on the model's own weights (the only path on a CPU)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.device(args.device).type == "cuda"
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=(0.9, 0.95), fused=fused or None, foreach=not fused
    )
    b, s = args.micro_batch_size, args.seq_length
    positions = torch.arange(s, device=args.device).expand(b, s)

    def step(tokens, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad, foreach=True)
        optimizer.step()
        return loss.detach()

    return step, f"model weights in {args.dtype}, torch AdamW ({'fused' if fused else 'foreach'}), no masters"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = megatron_core_problem()
    if problem:
        print(f"mcore_peer.py: error: {problem}", file=sys.stderr)
        return 2
    import megatron.core

    device = torch.device(args.device)
    if device.type == "cpu":
        allow_cpu()
    init_parallel(device)
    config = transformer_config(args)
    model = build_model(args, config)
    if args.step == "megatron":
        step, optimizer_note = megatron_step(args, model, config)
    else:
        step, optimizer_note = plain_step(args, model)
    batches = synthetic_batches(args.seed, args.micro_batch_size, args.seq_length, args.vocab_size, device)
    result = time_steps(step, batches, warmup=args.warmup, steps=args.steps, device=device)
    recompute = ", selective recompute of the attention core" if args.recompute else ""
    result.update(
        peer="megatron-core",
        version=megatron.core.__version__,
        device=device_description(device),
        parameters=sum(p.numel() for p in model.parameters()),
        notes=f"megatron-core {megatron.core.__version__}, local spec, {args.attention} attention{recompute}, "
        f"{optimizer_note}",
    )
    emit_result(result)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

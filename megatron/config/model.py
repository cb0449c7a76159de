"""Model shape and numerics (`cfg.model`)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_choice, require_positive, require_range, show

ATTENTION_HEAD_TYPES = ("multihead", "multiquery")
ACTIVATIONS = ("gelu_tanh", "gelu")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
FP8_FORMATS = ("hybrid", "e4m3")  # megatron.model.fp8 applies them


def _divisors_near(n: int, target: int, count: int = 4) -> list[int]:
    """Divisors of n closest to target, for 'use one of ...' hints."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - target), d))[:count])


@dataclass
class ModelConfig:
    """GPT-2 decoder shape. Derived sizes (ffn_hidden_size, kv_channels, max_position_embeddings)
    are filled in on construction when left None; `dataclasses.replace` carries them over, so pass
    them as None again when changing hidden_size, num_attention_heads or seq_length that way."""

    num_layers: int | None = arg(None, "Number of transformer layers.")
    hidden_size: int | None = arg(None, "Transformer hidden size.")
    num_attention_heads: int | None = arg(None, "Number of (query) attention heads.")
    ffn_hidden_size: int | None = arg(None, "MLP hidden size (default 4 * --hidden-size).")
    kv_channels: int | None = arg(
        None, "Size of one attention head (default --hidden-size / --num-attention-heads)."
    )
    attention_head_type: str = arg(
        "multihead",
        "multihead: one key/value head per query head; multiquery: one shared key/value head (MQA).",
        choices=ATTENTION_HEAD_TYPES,
    )
    seq_length: int | None = arg(None, "Sequence length of a training sample (tokens).")
    max_position_embeddings: int | None = arg(
        None, "Number of learned position embeddings (default --seq-length); must be >= --seq-length."
    )
    make_vocab_size_divisible_by: int = arg(
        128, "Pad the vocabulary to a multiple of this times --tensor-model-parallel-size (Megatron's rule)."
    )
    vocab_size: int | None = arg(
        None,
        "Model vocabulary (embedding rows); must hold the tokenizer. Default: the tokenizer's size padded to "
        "a multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size.",
    )
    init_method_std: float = arg(
        0.02, "Std of the normal init; output projections use std / sqrt(2 * --num-layers)."
    )
    attention_dropout: float = arg(0.1, "Dropout probability on the attention weights.")
    hidden_dropout: float = arg(0.1, "Dropout probability on the residual branches and embeddings.")
    layernorm_epsilon: float = arg(1e-5, "LayerNorm epsilon.")
    untie_embeddings_and_output_weights: bool = arg(
        False, "Use a separate output layer instead of the (default) tied input embedding."
    )
    activation: str = arg(
        "gelu_tanh",
        "MLP activation: gelu_tanh (tanh approximation, as StarCoder trained) or gelu (exact erf).",
        choices=ACTIVATIONS,
        const_flags={"--openai-gelu": "gelu_tanh"},
    )
    use_flash_attn: bool = arg(
        False, "Use flash-attn kernels when installed on a GPU (no effect on CPU: SDPA is used)."
    )
    torch_compile: bool = arg(
        False,
        "Run each transformer layer's training forward (and its backward) through torch.compile: "
        "LayerNorm, bias + GELU, dropout and the residual adds become a few generated kernels. Compiles "
        "during the first iteration; evaluation and generation stay eager. Needs Triton on GPUs or a C++ "
        "compiler on CPUs. "
        "Works with tensor, sequence and pipeline parallelism and activation recomputation (collectives "
        "run between compiled pieces). Default: off (eager).",
    )
    fp8_format: str | None = arg(
        None,
        "FP8 GEMMs in the decoder layers' MLP and attention output projection, through torchao's float8 "
        "training (dynamic per-tensor scales; weights, gradients and optimizer unchanged): hybrid (e4m3 "
        "activations and weights, e5m2 gradients) or e4m3 (e4m3 throughout). Needs --bf16, "
        "--tensor-model-parallel-size 1, the torchao package and, on a GPU, FP8 support (H100/H200: "
        "compute capability 8.9 or higher). Default: off (bf16 GEMMs).",
        choices=FP8_FORMATS,
    )
    attention_softmax_in_fp32: bool = arg(
        True,
        "Compute the attention softmax in fp32 (default on; --no-attention-softmax-in-fp32 to disable).",
        negatable=True,
    )
    recompute_granularity: str | None = arg(
        None,
        "Activation recomputation: full (a checkpointed group of layers keeps only its input and reruns its "
        "forward in backward; needs --recompute-method and --recompute-num-layers) or selective (only the "
        "attention core: scores, softmax, dropout, weighted sum). Dropout draws are replayed, so the "
        "gradients are bit-identical. Default: off.",
        choices=RECOMPUTE_GRANULARITIES,
        const_flags={"--recompute-activations": "selective"},
    )
    recompute_method: str | None = arg(
        None,
        "With --recompute-granularity full: uniform (each model chunk's layers in consecutive groups of "
        "--recompute-num-layers, each group checkpointed) or block (only the first --recompute-num-layers "
        "layers of each model chunk, one by one).",
        choices=RECOMPUTE_METHODS,
    )
    recompute_num_layers: int | None = arg(
        None, "Layers per checkpointed group (uniform) or checkpointed layers per model chunk (block)."
    )
    checkpoint_activations: bool = arg(
        False,
        "Megatron's older flag: same as --recompute-granularity full --recompute-method uniform "
        "--recompute-num-layers 1 (the last two unless given).",
    )

    def __post_init__(self) -> None:
        self.resolve()

    def resolve(self) -> None:
        """Fill in derived sizes left None (idempotent)."""
        if self.ffn_hidden_size is None and self.hidden_size is not None:
            self.ffn_hidden_size = 4 * self.hidden_size
        heads_divide = (
            self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0
        )
        if self.kv_channels is None and heads_divide:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.max_position_embeddings is None and self.seq_length is not None:
            self.max_position_embeddings = self.seq_length
        if self.checkpoint_activations and self.recompute_granularity is None:
            self.recompute_granularity = "full"
        if self.checkpoint_activations and self.recompute_granularity == "full":
            if self.recompute_method is None:
                self.recompute_method = "uniform"
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads: 1 for multi-query attention, else one per query head."""
        return 1 if self.attention_head_type == "multiquery" else self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the offending flags and what would be valid."""
        self.resolve()
        require_positive(self, "num_layers", "hidden_size", "num_attention_heads", "seq_length")
        if self.hidden_size % self.num_attention_heads:
            options = ", ".join(map(str, _divisors_near(self.hidden_size, self.num_attention_heads)))
            raise ConfigError(
                f"{show('hidden_size', self.hidden_size)} is not divisible by "
                f"{show('num_attention_heads', self.num_attention_heads)}; "
                f"valid head counts near it: {options}"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"{show('seq_length', self.seq_length)} is larger than "
                f"{show('max_position_embeddings', self.max_position_embeddings)}; "
                f"use --seq-length <= {self.max_position_embeddings} or --max-position-embeddings >= {self.seq_length}"
            )
        require_positive(
            self, "ffn_hidden_size", "kv_channels", "max_position_embeddings", "layernorm_epsilon"
        )
        require_positive(self, "make_vocab_size_divisible_by", "init_method_std")
        require_positive(self, "vocab_size", allow_none=True)
        require_range(self, "attention_dropout", 0.0, 1.0, high_open=True)
        require_range(self, "hidden_dropout", 0.0, 1.0, high_open=True)
        require_choice(self, "attention_head_type", ATTENTION_HEAD_TYPES)
        require_choice(self, "activation", ACTIVATIONS)
        if self.fp8_format is not None:
            require_choice(self, "fp8_format", FP8_FORMATS)
        self._validate_recompute()

    def check_fp8(self, precision: str, tensor_model_parallel_size: int, device_type: str) -> None:
        """--fp8-format needs bf16 weights, tensor-parallel size 1 (torchao swaps plain linears), torchao,
        and on CUDA a GPU with FP8 GEMMs; checked before any process group exists."""
        if self.fp8_format is None:
            return
        fp8 = show("fp8_format", self.fp8_format)
        if precision != "bf16":
            raise ConfigError(f"{fp8} needs --bf16 (got {precision}): FP8 GEMMs scale bf16 inputs")
        if tensor_model_parallel_size != 1:
            raise ConfigError(
                f"{fp8} needs --tensor-model-parallel-size 1 (got {tensor_model_parallel_size}): the "
                "tensor-parallel linears are not converted to FP8; use data or pipeline parallelism"
            )
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"{fp8} needs the torchao package (pip install torchao), or drop it")
        if device_type == "cuda":
            import torch

            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                raise ConfigError(
                    f"{fp8} needs a GPU with FP8 GEMMs (compute capability >= 8.9: H100, H200, L4, "
                    f"RTX 40xx); this one is {major}.{minor}: drop --fp8-format"
                )

    def check_torch_compile(self, device_type: str) -> None:
        """--torch-compile needs inductor's code generator for the device: Triton on CUDA, a C++
        compiler ($CXX, else g++ or c++) on the CPU. Checked before any process group exists."""
        if not self.torch_compile:
            return
        if device_type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ConfigError(
                "--torch-compile on a GPU needs Triton (torch.compile generates Triton kernels): "
                "pip install triton, or drop --torch-compile"
            )
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
        if device_type == "cpu" and not any(shutil.which(c) for c in compilers):
            raise ConfigError(
                f"--torch-compile on the CPU needs a C++ compiler ({' or '.join(compilers)} not found on "
                "PATH; torch.compile builds C++ kernels): install one, or drop --torch-compile"
            )

    def _validate_recompute(self) -> None:
        """Megatron's rules: full needs a method and a layer count, selective takes neither."""
        granularity, method, count = (
            self.recompute_granularity,
            self.recompute_method,
            self.recompute_num_layers,
        )
        if granularity is not None:
            require_choice(self, "recompute_granularity", RECOMPUTE_GRANULARITIES)
        if method is not None:
            require_choice(self, "recompute_method", RECOMPUTE_METHODS)
        if self.checkpoint_activations and granularity != "full":
            raise ConfigError(
                f"--checkpoint-activations means --recompute-granularity full, but "
                f"{show('recompute_granularity', granularity)} was given; drop one of them"
            )
        if granularity == "full":
            if method is None:
                raise ConfigError(
                    "--recompute-granularity full needs --recompute-method uniform or block (and "
                    "--recompute-num-layers)"
                )
            if count is None or not 1 <= count <= self.num_layers:
                got = "it is missing" if count is None else f"got {count}"
                raise ConfigError(
                    f"--recompute-granularity full --recompute-method {method} needs --recompute-num-layers "
                    f"between 1 and {show('num_layers', self.num_layers)}; {got}"
                )
            return
        for name, value in (("recompute_method", method), ("recompute_num_layers", count)):
            if value is not None:
                needs = "" if granularity is None else f", not {show('recompute_granularity', granularity)}"
                raise ConfigError(f"{show(name, value)} needs --recompute-granularity full{needs}")

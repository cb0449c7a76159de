"""FP8 training of the decoder layers' linear layers (`--fp8-format`), through torchao's float8 training.

`convert_to_fp8(model, fp8_format)` swaps the MLP's two linears and the attention output projection of
every layer for torchao's `Float8Linear`: their GEMMs (forward, input and weight gradients) run in FP8
with dynamic per-tensor scales (`torch._scaled_mm`, the cuBLAS FP8 GEMM on H100/H200), while the
weights, gradients and optimizer stay as they are (bf16 weights, fp32 masters). The swap keeps the same
Parameter objects under the same names, so their sharding attributes, the gradient buffer, the
initialisation and checkpoints are unchanged. Formats, as Megatron's `--fp8-format` names them:
"hybrid" (e4m3 activations and weights, e5m2 output gradients: torchao's default) and "e4m3" (e4m3
for all three).

Left in bf16: the fused multi-query Q + K/V projection (one GEMM over two weights, `kernels.concat_linear`,
not a module call), the attention core and the tied output layer (its GEMM is inside the fused
cross-entropy), as FP8 recipes usually keep the first and last layers in high precision. Linears whose
sizes are not multiples of 16 (FP8 GEMM alignment) stay too. Tensor-parallel layers are not `nn.Linear`
and are not converted: the config refuses --fp8-format with tensor-parallel size > 1.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.config.model import FP8_FORMATS

# module names (the last two parts) converted in each layer
FP8_LINEARS = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "attention.dense")


def _converted(module: nn.Module, name: str) -> bool:
    aligned = module.in_features % 16 == 0 and module.out_features % 16 == 0
    return aligned and name.endswith(FP8_LINEARS) and ".layers." in f".{name}"


def convert_to_fp8(model: nn.Module, fp8_format: str) -> list[str]:
    """Swap the linears named in `FP8_LINEARS` for torchao `Float8Linear` in place (see the module
    docstring); returns their names. Needs torchao."""
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"fp8_format={fp8_format!r} is not valid; use one of {', '.join(FP8_FORMATS)}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import CastConfig

    config = Float8LinearConfig()  # dynamic per-tensor scales; e4m3 inputs and weights, e5m2 gradients
    if fp8_format == "e4m3":
        config = Float8LinearConfig(cast_config_grad_output=CastConfig(target_dtype=torch.float8_e4m3fn))
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    converted = [name for name in names if _converted(model.get_submodule(name), name)]
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, name: _converted(module, name)
    )
    return converted

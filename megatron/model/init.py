"""Layout-invariant initialisation: every element is a function of (seed, logical parameter name, position).

Each parameter carries `init_method` ("normal", "zeros" or "ones") and `init_std` (set by the leaf-layer
factories in `megatron.model.layers`). A "normal" parameter is drawn whole (its logical `full_shape`) on the
CPU in fp32 from its own generator, seeded by (seed, name), and this rank's tensor-parallel slice is copied
in. So the result does not depend on build order, device, dtype, the global RNG or the parallel layout: a
model built at TP 4 / PP 4 holds, gathered, the TP 1 / PP 1 model's weights bit for bit, which is what the
parity tests compare. (Drawing the whole tensor on every rank costs host time at 15B scale; a
counter-based generator that draws only the local slice would remove it without changing this contract.)
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed that depends only on (seed, parameter name)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def local_shard(full: torch.Tensor, param: nn.Parameter, tensor_model_parallel_rank: int) -> torch.Tensor:
    """The slice of the full tensor `full` that tensor-parallel rank `tensor_model_parallel_rank` holds as
    `param` (contiguous chunks along `partition_dim`, rank order); `full` itself when not split."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    return full.narrow(dim, tensor_model_parallel_rank * size, size)


@torch.no_grad()
def init_parameter(param: nn.Parameter, seed: int, name: str, *, tensor_model_parallel_rank: int = 0) -> None:
    """Initialise one parameter per its `init_method`/`init_std` attributes: draw the full tensor and keep
    the slice of tensor-parallel rank `tensor_model_parallel_rank`."""
    method = getattr(param, "init_method", None)
    if method == "zeros":
        param.zero_()
    elif method == "ones":
        param.fill_(1.0)
    elif method == "normal":
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
        shape = getattr(param, "full_shape", tuple(param.shape))
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, param.init_std, generator=generator)
        param.copy_(local_shard(full, param, tensor_model_parallel_rank))
    else:
        raise AssertionError(f"parameter {name} has no init_method attribute")


def init_weights(model: nn.Module, seed: int, tensor_model_parallel_rank: int = 0) -> None:
    """Initialise every parameter of `model` (a GPTModel or a pipeline stage of one) by its logical name:
    normal(0, init_method_std) for weights (attention.dense and mlp.dense_4h_to_h: init_method_std /
    sqrt(2 * num_layers)), zeros for biases, ones for LayerNorm weights."""
    for name, param in model.named_parameters():
        init_parameter(param, seed, name, tensor_model_parallel_rank=tensor_model_parallel_rank)

"""The GPT model (StarCoder architecture), its FLOPs/parameter accounting and device peaks."""

from megatron.model.flops import device_peak_flops, flops_per_token, num_parameters
from megatron.model.gpt import GPTModel

__all__ = ["GPTModel", "device_peak_flops", "flops_per_token", "num_parameters"]

"""The GPT model (StarCoder architecture), its pipeline stages, FLOPs/parameter accounting and device peaks."""

from megatron.model.flops import device_peak_flops, flops_per_token, num_parameters
from megatron.model.gpt import GPTModel
from megatron.model.stage import GPTStage, build_model

__all__ = ["GPTModel", "GPTStage", "build_model", "device_peak_flops", "flops_per_token", "num_parameters"]

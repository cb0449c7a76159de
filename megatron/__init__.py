"""Megatron-style pretraining for StarCoder-class code models."""

__version__ = "0.1.0"

"""Tokenizer set-up, kept free of torch so that `megatron.pretrain` rejects a tokenizer larger than the
model's vocabulary in well under two seconds, before torch is imported."""

from __future__ import annotations


def build_tokenizer_for(cfg):
    """The tokenizer named by the config, padded to the model's vocabulary rule."""
    from megatron.data.tokenizer import build_tokenizer

    data = cfg.data
    return build_tokenizer(
        data.tokenizer_type,
        tokenizer_file=data.tokenizer_file,
        vocab_file=data.vocab_file,
        merge_file=data.merge_file,
        tokenizer_model=data.tokenizer_model,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
    )


def checked_tokenizer(cfg):
    """(tokenizer, model vocabulary size); ConfigError (a ValueError) when the tokenizer does not fit."""
    from megatron.config import check_vocab_size

    tokenizer = build_tokenizer_for(cfg)
    return tokenizer, check_vocab_size(cfg, tokenizer.vocab_size)

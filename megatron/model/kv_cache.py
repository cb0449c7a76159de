"""The key/value cache of incremental decoding (one process, tensor-parallel size 1).

`KVCache` preallocates every layer's keys and values; `GPTModel.forward(tokens, kv_cache=cache)` runs the
new positions, each attention layer appending its keys and values through its `LayerKVCache` view and
attending over everything cached so far. Multi-query attention caches its ONE shared K/V head
([b, max_length, 1, d] per layer), multi-head every head.

Masking: causal over the cached and new positions, and keys of left padding (recorded with
`mark_padding`) masked for every later query. The mask of one forward is built once (`begin`) and shared
by every layer.
"""

from __future__ import annotations

import math

import torch


class KVCache:
    """Keys and values of `num_layers` layers for `batch_size` sequences of up to `max_length` positions.

    `length` positions are filled; `key_padding` (bool [b, max_length], True = a real token) and its
    additive form `key_bias` (0 / -inf) mark the left padding of batched prompts.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype=torch.float32,
        device=None,
    ) -> None:
        shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
        self._keys = torch.zeros(shape, dtype=dtype, device=device)
        self._values = torch.zeros(shape, dtype=dtype, device=device)
        self.keys, self.values = list(self._keys.unbind(0)), list(self._values.unbind(0))
        self.key_padding = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        # the padding mask as an additive bias, kept in step with key_padding: a decoding step's mask is a
        # slice of it, not a rebuilt tensor
        self.key_bias = torch.zeros(batch_size, max_length, dtype=dtype, device=device)
        self.padded = False
        self.batch_size, self.max_length, self.length = batch_size, max_length, 0
        self.num_new = 0  # positions the forward in progress adds
        self.bias: torch.Tensor | None = None  # that forward's mask (see `attention_bias`)
        self.layers = [LayerKVCache(self, i) for i in range(num_layers)]

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept)."""
        self.length = 0
        self.key_padding.fill_(True)
        self.key_bias.zero_()
        self.padded = False

    def mark_padding(self, attention_mask: torch.Tensor) -> None:
        """Record which of the next positions [length, length + t) are real tokens (bool [b, t],
        True = real), before the forward that adds them."""
        start, end = self.length, self.length + attention_mask.shape[1]
        self.key_padding[:, start:end] = attention_mask
        self.key_bias[:, start:end] = 0.0
        self.key_bias[:, start:end].masked_fill_(~attention_mask, -math.inf)
        self.padded = self.padded or not bool(attention_mask.all())

    def begin(self, num_new: int) -> int:
        """Start a forward that adds `num_new` positions: build its mask; returns the first new position."""
        if self.length + num_new > self.max_length:
            raise ValueError(
                f"KV cache holds {self.max_length} positions; {self.length} used + {num_new} new exceed it"
            )
        self.num_new = num_new
        self.bias = self.attention_bias(self.length, num_new)
        return self.length

    def end(self) -> None:
        """Finish the forward begun with `begin`: its positions now count as cached."""
        self.length += self.num_new
        self.num_new, self.bias = 0, None

    def attention_bias(self, start: int, num_new: int) -> torch.Tensor | None:
        """The additive mask for new positions [start, start + num_new) against all keys so far:
        None for one unpadded position (nothing to mask), a slice of `key_bias` [b, 1, L] for one
        position of a padded batch, else `cached_attention_bias` [b, t, L]."""
        if num_new == 1:
            return self.key_bias[:, None, : start + 1] if self.padded else None
        return cached_attention_bias(self, start, num_new, self.key_bias)


class LayerKVCache:
    """One layer's part of a `KVCache`: its key and value buffers [b, max_length, nkv, d], and (multi-query)
    the fused query + key/value projection, concatenated once per cache rather than on every call: at
    one token per step the training path's per-call concatenation would copy the weights as often as it
    reads them."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache = cache
        self.keys, self.values = cache.keys[layer], cache.values[layer]
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        """The mask of the forward in progress (`KVCache.begin`)."""
        return self.cache.bias

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [b, t, nkv, d] after the cached ones; returns the keys and values
        of every position so far, [b, length + t, nkv, d] (views of the buffers)."""
        start = self.cache.length
        end = start + k.shape[1]
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        return self.keys[:, :end], self.values[:, :end]

    def fused_projection(self, query, key_value) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the query and key/value linears stacked (query rows first)."""
        if self._fused is None:
            self._fused = (
                torch.cat([query.weight, key_value.weight]),
                torch.cat([query.bias, key_value.bias]),
            )
        return self._fused


def cached_attention_bias(cache: KVCache, start: int, num_new: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask (0 / -inf) [b, num_new, start + num_new] for new positions [start, start + num_new)
    against every cached key: causal, and padding keys masked except a position's own key, so a padding
    query still has one key to attend to (its output is never used) and the softmax never sees a row of
    -inf only."""
    end = start + num_new
    query_pos = torch.arange(start, end, device=like.device)[:, None]  # [t, 1]
    key_pos = torch.arange(end, device=like.device)[None, :]  # [1, L]
    masked = (key_pos > query_pos)[None] | (~cache.key_padding[:, None, :end] & (key_pos != query_pos)[None])
    bias = torch.zeros(masked.shape, dtype=like.dtype, device=like.device)
    return bias.masked_fill_(masked, -math.inf)  # [b, t, L]

"""64-bit hashes of token windows, vectorised with NumPy.

The hash of the ``k`` tokens ``t[p : p + k]`` is the polynomial ``sum_j (t[p + j] + 1) * B^(k - 1 - j)``
modulo 2^64 (``B`` an odd 64-bit base drawn from the seed), passed through splitmix64's finaliser so
that every output bit depends on every input bit (the postings are sharded by the top bits). It is
computed for many windows at once: ``k`` multiply-adds over strided views, about one multiply-add per
token when the windows are ``k`` apart or sampled every ``s >= k - 1`` positions.
"""

from __future__ import annotations

import numpy as np

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def hash_base(seed: int) -> np.uint64:
    """The odd polynomial base of ``seed``."""
    rng = np.random.default_rng(seed)
    return np.uint64(int(rng.integers(1 << 62, 1 << 63, dtype=np.int64)) * 2 + 1)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (returned)."""
    with np.errstate(over="ignore"):
        values ^= values >> np.uint64(30)
        values *= _MIX_1
        values ^= values >> np.uint64(27)
        values *= _MIX_2
        values ^= values >> np.uint64(31)
    return values


def window_hashes(tokens: np.ndarray, k: int, stride: int, base: np.uint64) -> np.ndarray:
    """Hashes of the windows ``tokens[p : p + k]`` for ``p = 0, stride, 2 * stride, ...`` that fit."""
    count = 0 if len(tokens) < k else (len(tokens) - k) // stride + 1
    hashes = np.zeros(count, dtype=np.uint64)
    if count == 0:
        return hashes
    one = np.uint64(1)
    with np.errstate(over="ignore"):
        for j in range(k):
            hashes *= base
            hashes += tokens[j : j + stride * (count - 1) + 1 : stride].astype(np.uint64)
            hashes += one
    return mix64(hashes)

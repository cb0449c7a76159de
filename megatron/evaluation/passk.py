"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, the probability that at least one of k samples drawn
without replacement passes is 1 - C(n-c, k) / C(n, k), computed as the numerically stable product
1 - prod_{i=n-c+1}^{n} (1 - k / i). A task's pass@k is the mean over its problems; it is reported for
k in 1, 10, 100 where every problem has n >= k samples.
"""

from __future__ import annotations

import numpy as np

REPORTED_K = (1, 10, 100)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem with `num_correct` of `num_samples` passing."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must be in [0, num_samples={num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must be in [1, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def mean_pass_at_k(counts: list[tuple[int, int]], ks=REPORTED_K) -> dict[str, float]:
    """{"pass@k": mean over problems} for each k in `ks` that every problem's (n, c) allows."""
    if not counts:
        return {}
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks if k <= smallest}

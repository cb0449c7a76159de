"""Benchmark: GPT dataset index build and dataset blending, against Megatron-LM's algorithms.

Full size (the issue's numbers): 10 million documents of mean length 1,000 tokens at seq 8192 over 11
epochs (about 1e11 tokens; Megatron-LM's C++ helpers take 19 s here, target under 8 s), and a blend of
600 datasets into 12 million samples (Megatron-LM 6.6 s, target under 1 s).

The reference, measured in the same run, is a straightforward NumPy/Python port of Megatron-LM's
algorithm: ``RandomState.shuffle`` of the tiled doc_idx and of the sample permutation (timed in full),
its per-sample ``build_sample_idx`` loop and its per-sample greedy blend loop (both pure Python, timed on
a prefix and extrapolated linearly; labelled as such). ``--quick`` runs a tenth of the sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from megatron.data import blend, gpt_dataset

INDEX_TARGET_S = 8.0
BLEND_TARGET_S = 1.0


def reference_sample_idx(sizes, doc_idx, seq_length: int, num_rows: int) -> np.ndarray:
    """Megatron-LM's build_sample_idx loop (helpers.cpp), ported line by line, for the first rows."""
    sample_idx = np.zeros((num_rows, 2), dtype=np.int64)
    doc_position, doc_offset = 0, 0
    for row in range(1, num_rows):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_position]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_position += 1
                doc_offset = 0
        sample_idx[row] = doc_position, doc_offset
    return sample_idx


def reference_blend(weights: np.ndarray, num_steps: int) -> np.ndarray:
    """Megatron-LM's build_blending_indices loop (helpers.cpp), ported, for the first steps."""
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(num_steps, dtype=np.int32)
    for step in range(num_steps):
        errors = weights * max(step, 1) - counts
        chosen = int(np.argmax(errors))
        dataset_index[step] = chosen
        counts[chosen] += 1
    return dataset_index


def max_prefix_deviation(weights, dataset_index, sample_index) -> float:
    """Largest |achieved - weight * k| over all datasets and prefixes k, in O(size).

    A dataset's lag peaks just before each of its picks and its lead just after; the tail after its last
    pick is covered by the final counts.
    """
    steps = np.arange(len(dataset_index), dtype=np.float64)
    w = weights[dataset_index]
    behind = w * steps - sample_index
    ahead = sample_index + 1 - w * (steps + 1)
    final = np.abs(np.bincount(dataset_index, minlength=len(weights)) - weights * len(dataset_index))
    return float(max(behind.max(initial=0.0), ahead.max(initial=0.0), final.max()))


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def timed_with_cpu(function, *args):
    """(result, wall seconds, CPU seconds of this process): a gap between the two means contention."""
    cpu_started = time.process_time()
    result, wall = timed(function, *args)
    return result, wall, time.process_time() - cpu_started


def bench_index(
    num_documents: int, seq_length: int, epochs: float, seed: int, prefix_samples: int
) -> tuple[float, float]:
    """Ours vs the reference for the index build; returns (ours_s, reference_s)."""
    sizes = np.random.default_rng(0).integers(1, 2000, num_documents, dtype=np.int32)  # mean ~1000
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    num_samples = int(epochs * tokens_per_epoch) // seq_length
    plan = gpt_dataset.plan_indices(sizes, (0, num_documents), num_samples, seq_length)
    print(
        f"index build: {num_documents:,} documents, {tokens_per_epoch * plan.num_epochs:,} tokens, "
        f"{plan.num_epochs} epochs (separate last epoch: {plan.separate_last_epoch}), "
        f"{plan.num_samples_total:,} samples of {seq_length}"
    )
    ours, ours_s, ours_cpu = timed_with_cpu(
        gpt_dataset.build_indices, sizes, (0, num_documents), num_samples, seq_length, seed
    )
    print(f"  ours      total {ours_s:7.2f} s (doc_idx + sample_idx + shuffle_idx; CPU {ours_cpu:.2f} s)")
    del ours  # free memory before the reference allocates its own
    rng = np.random.RandomState(seed)
    tiled = np.tile(np.arange(num_documents, dtype=np.int32), plan.num_epochs)
    _, doc_s = timed(rng.shuffle, tiled)
    rows = min(prefix_samples, plan.num_samples_total) + 1
    reference, prefix_s = timed(reference_sample_idx, sizes, tiled, seq_length, rows)
    sample_s = prefix_s * plan.num_samples_total / (rows - 1)
    # the same doc_idx through our vectorised search must give the reference loop's rows
    ours_rows = gpt_dataset.build_sample_idx(sizes, tiled, seq_length, rows - 1)
    assert np.array_equal(ours_rows, reference), "sample_idx differs from the reference loop"
    shuffle = np.arange(plan.num_samples_total, dtype=np.uint32)
    _, shuffle_s = timed(rng.shuffle, shuffle)
    reference_s = doc_s + sample_s + shuffle_s
    print(
        f"  reference total {reference_s:7.2f} s = doc_idx RandomState.shuffle {doc_s:.2f} s + sample_idx "
        f"Python loop {sample_s:.2f} s (EXTRAPOLATED from {rows - 1:,} samples, {prefix_s:.2f} s) + "
        f"shuffle_idx RandomState.shuffle {shuffle_s:.2f} s"
    )
    print(
        f"  (reference shuffles alone, a floor for Megatron-LM whose C++ loop adds to it: {doc_s + shuffle_s:.2f} s)"
    )
    return ours_s, reference_s, doc_s + shuffle_s


def bench_blend(num_datasets: int, num_samples: int, prefix_steps: int) -> tuple[float, float]:
    """Ours vs the reference for blending; returns (ours_s, reference_s)."""
    weights = blend.normalize_weights(np.random.default_rng(1).random(num_datasets))
    blend.blending_indices(weights, 10)  # compile/load the kernel outside the timing
    print(f"blending: {num_datasets} datasets into {num_samples:,} samples")
    (dataset_index, sample_index), ours_s, ours_cpu = timed_with_cpu(
        blend.blending_indices, weights, num_samples
    )
    worst = max_prefix_deviation(weights, dataset_index, sample_index)
    print(
        f"  ours      {ours_s:7.2f} s (CPU {ours_cpu:.2f} s; every prefix within {worst:.3f} samples of target)"
    )
    steps = min(prefix_steps, num_samples)
    _, prefix_s = timed(reference_blend, weights, steps)
    reference_s = prefix_s * num_samples / steps
    print(
        f"  reference {reference_s:7.2f} s (Megatron's greedy loop in Python, EXTRAPOLATED from {steps:,} "
        f"steps, {prefix_s:.2f} s)"
    )
    return ours_s, reference_s


def _load() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def verdict(ours_s: float, target_s: float, full_size: bool) -> str:
    if not full_size:
        return "target applies to the full size (run without --quick)"
    return f"{'PASS' if ours_s < target_s else 'FAIL'} (target < {target_s:g} s)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the full sizes")
    parser.add_argument("--num-documents", type=int, default=None, help="documents (default 10M; quick 1M)")
    parser.add_argument("--seq-length", type=int, default=8192, help="sequence length (default 8192)")
    parser.add_argument("--epochs", type=float, default=10.5, help="epochs of samples requested (10.5 -> 11)")
    parser.add_argument("--num-datasets", type=int, default=600, help="datasets to blend (default 600)")
    parser.add_argument(
        "--blend-samples", type=int, default=None, help="blend size (default 12M; quick 1.2M)"
    )
    parser.add_argument("--reference-prefix", type=int, default=20000, help="steps of the Python loops timed")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    num_documents = args.num_documents or 10_000_000 // scale
    blend_samples = args.blend_samples or 12_000_000 // scale
    full_size = not args.quick and num_documents >= 10_000_000 and blend_samples >= 12_000_000
    index_ours, index_reference, index_floor = bench_index(
        num_documents, args.seq_length, args.epochs, args.seed, args.reference_prefix
    )
    blend_ours, blend_reference = bench_blend(args.num_datasets, blend_samples, args.reference_prefix)
    print(f"\nsummary (same run; other processes on the machine affect both sides; load average {_load()})")
    print(
        f"  index build: ours {index_ours:.2f} s, reference {index_reference:.2f} s, "
        f"ratio {index_reference / index_ours:.1f}x (vs the reference's shuffles alone "
        f"{index_floor / index_ours:.1f}x), {verdict(index_ours, INDEX_TARGET_S, full_size)}"
    )
    print(
        f"  blending:    ours {blend_ours:.2f} s, reference {blend_reference:.2f} s, "
        f"ratio {blend_reference / blend_ours:.1f}x, {verdict(blend_ours, BLEND_TARGET_S, full_size)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

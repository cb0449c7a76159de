"""What every process of `bench/gpu_train_step.py` shares: the synthetic batches, the step timing and the
result line. It imports no `megatron` package, so both our workers and the Megatron-core peer (whose
package is also called `megatron`) can use it.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

RESULT_PREFIX = "RESULT "
NUM_BATCHES = 4  # distinct synthetic batches, cycled through


def synthetic_batches(seed: int, micro_batch_size: int, seq_length: int, vocab_size: int, device):
    """NUM_BATCHES (tokens, labels) pairs, each [b, s] int64, labels = tokens shifted by one: the same
    values in every process for the same arguments (drawn on the CPU from a seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randint(
        0, vocab_size, (NUM_BATCHES, micro_batch_size, seq_length + 1), generator=generator
    )
    samples = samples.to(device)
    return [(sample[:, :-1].contiguous(), sample[:, 1:].contiguous()) for sample in samples]


def time_steps(step, batches, *, warmup: int, steps: int, device) -> dict:
    """Run `step(tokens, labels)` (returns the loss, a tensor or float) once on the first batch (its loss
    is the first-step loss: the initial weights), `warmup - 1` more untimed steps, then `steps` timed
    steps. On CUDA each timed step is bracketed by CUDA events and the host waits only after the last
    one; the peak memory is `torch.cuda.max_memory_allocated` over the timed steps."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    first_loss = float(step(*batches[0]))
    for i in range(1, max(warmup, 1)):
        step(*batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            step(*batches[i % len(batches)])
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        seconds = []
        for i in range(steps):
            start_time = time.perf_counter()
            step(*batches[i % len(batches)])
            seconds.append(time.perf_counter() - start_time)
        peak = None
    return {
        "first_loss": first_loss,
        "step_seconds": seconds,
        "median_step_seconds": statistics.median(seconds),
        "peak_memory_bytes": peak,
    }


def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def emit_result(result: dict) -> None:
    """The worker's one result line (JSON), read by `bench/gpu_train_step.py`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(output: str) -> dict | None:
    """The last result line in a worker's output, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None

"""Counting host syncs: the places where the host waits for a value computed on the device.

On a GPU, `.item()`, `.tolist()`, `bool(t)`, `float(t)`, `int(t)`, `f"{t}"`, `.numpy()`, `.cpu()`, the
comparisons that return a Python bool (`torch.equal`, `torch.allclose`), data-dependent shapes
(`nonzero`, `unique`, `masked_select`) and `torch.cuda.synchronize` each stall the host until the device
has caught up. CI has no GPU, so `count_host_syncs()` patches those entry points and records every call
made directly from the framework's own code (a frame in megatron/), whatever the tensor's device, plus,
on a GPU, every call on a CUDA tensor from anywhere.

Left out, because they are not device syncs: megatron/data/ (the loader's CPU tensors, in worker
processes in a real run), megatron/parallel/strict_backend.py (CI's checking backend, CPU only), and
torch's own reads of CPU tensors (AdamW's step counters: on CUDA the fused AdamW keeps them on the device).

    with count_host_syncs() as syncs:
        train_step(...)
    assert syncs.count == 1, syncs.calls
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import megatron

MEGATRON_DIR = str(Path(megatron.__file__).resolve().parent) + "/"
NOT_COUNTED = (MEGATRON_DIR + "data/", MEGATRON_DIR + "parallel/strict_backend.py")
TENSOR_METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
    "__array__",
    "equal",
    "allclose",
    "nonzero",
    "unique",
    "masked_select",
)
TORCH_FUNCTIONS = ("equal", "allclose", "nonzero", "unique", "masked_select")
CUDA_SYNCHRONIZE = (
    (torch.cuda, "synchronize"),
    (torch.cuda.Stream, "synchronize"),
    (torch.cuda.Event, "synchronize"),
)


@dataclass
class HostSyncs:
    """The counted calls: (what, "file:line function") in call order."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    paused: int = 0  # >0 while inside a counted call (its own nested reads are the same sync)

    @property
    def count(self) -> int:
        return len(self.calls)

    def since(self, start: int) -> list[tuple[str, str]]:
        return self.calls[start:]


def _framework_caller(frame) -> str | None:
    """'file:line function' when `frame` is megatron code that is counted, else None."""
    filename = frame.f_code.co_filename
    if filename.startswith(MEGATRON_DIR) and not filename.startswith(NOT_COUNTED):
        return f"{filename[len(MEGATRON_DIR) :]}:{frame.f_lineno} {frame.f_code.co_name}"
    return None


def _wrap(syncs: HostSyncs, what: str, original, tensor_arg: bool):
    def counted(*args, **kwargs):
        if not syncs.paused:
            frame = sys._getframe(1)
            where = _framework_caller(frame)
            on_cuda = tensor_arg and args and isinstance(args[0], torch.Tensor) and args[0].is_cuda
            if where is not None or on_cuda:
                syncs.calls.append((what, where or f"{frame.f_code.co_filename}:{frame.f_lineno}"))
        syncs.paused += 1
        try:
            return original(*args, **kwargs)
        finally:
            syncs.paused -= 1

    return counted


@contextmanager
def count_host_syncs():
    """Count host syncs (module docstring) while the block runs; yields a `HostSyncs`."""
    syncs = HostSyncs()
    patched = [(torch.Tensor, name, True) for name in TENSOR_METHODS]
    patched += [(torch, name, True) for name in TORCH_FUNCTIONS]
    patched += [(owner, name, False) for owner, name in CUDA_SYNCHRONIZE]
    # methods inherited from torch._C.TensorBase are not in torch.Tensor.__dict__: deleted afterwards
    originals = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
    try:
        for owner, name, tensor_arg in patched:
            label = f"{getattr(owner, '__name__', owner)}.{name}"
            setattr(owner, name, _wrap(syncs, label, getattr(owner, name), tensor_arg))
        yield syncs
    finally:
        for owner, name, original in originals:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


LOOP_FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
    "--seq-length 16 --max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 "
    "--train-iters 6 --lr 1e-3 --lr-warmup-iters 2 --log-interval 2 --eval-iters 0 --seed 7 "
    "--split 90,10,0 --num-workers 0 --tokenizer-type TokenizerFromFile"
)


def loop_config(workdir, dataset: str, tokenizer, *extra: str):
    """A 6-iteration run of the tiny GPT (hidden 64, 2 layers), logging every 2 iterations, no
    evaluation; `extra` flags appended."""
    from megatron.config import load_config

    argv = LOOP_FLAGS.split()
    argv += ["--data-path", dataset, "--tokenizer-file", str(tokenizer)]
    argv += ["--data-cache-path", str(Path(workdir) / "cache")]
    argv += ["--metrics-jsonl", str(Path(workdir) / "metrics.jsonl")]
    return load_config([*argv, *extra])


def loop_syncs_per_iteration(cfg, parallel_state, *, before_iteration=None) -> tuple[list[list], object]:
    """Train through the real loop (`build_run` + `train`) counting host syncs. Returns (the counted calls
    of each iteration, from its start to the next one's: step, logging, the stop check; the last
    iteration, which runs into the end of training, left out) and the run. `before_iteration(run, i)`
    is called before iteration i + 1 starts."""
    from megatron.training import train as loop

    run = loop.build_run(cfg, parallel_state)
    starts, one_iteration = [], loop._one_iteration

    def counted_iteration(run, *args, **kwargs):
        if before_iteration is not None:
            before_iteration(run, run.state.iteration)
        starts.append(syncs.count)
        return one_iteration(run, *args, **kwargs)

    loop._one_iteration = counted_iteration
    try:
        with count_host_syncs() as syncs:
            loop.train(run)
    finally:
        loop._one_iteration = one_iteration
        run.metrics.close()
    return [syncs.calls[a:b] for a, b in zip(starts, starts[1:], strict=False)], run

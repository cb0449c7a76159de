"""Checkpoint I/O: save and load GB/s of a model + optimizer state next to a plain sequential write/read of
the same bytes, and the training stall of an async save against a synchronous one.

Throughput: a GPT model (fp32, default about 60M parameters, so model + Adam moments are about 0.7 GB)
is checkpointed with `megatron.checkpoint.Checkpointer` (one process) and loaded back into fresh
objects; the reference writes the same tensors' bytes to one file with plain `write` calls (then fsync)
and reads them back into preallocated tensors with `readinto` (and, for comparison, into newly allocated
ones: first-touching new memory is part of any resume, and costly on some virtual machines). The
checkpoint loads into a model and optimizer that already hold state (trained one step), as a rollback
does, so its weights and Adam moments are read in place like the plain read's preallocated tensors.
Both sides are timed in the same run, `--repeats` times after one uncounted warm-up round (median
shown, and the median of the per-repeat ratios). The two writers take turns going first and each starts after `os.sync()`, so
neither pays for the other's writeback (with the checkpoint always second its ratio moved with the
disk's mood, 0.3x-0.8x on one machine); the two readers take turns too. GB/s counts tensor bytes (the
same numerator for both;
the checkpoint's on-disk size is printed too). The checkpoint's save time is everything a caller
waits for: DCP write, fsync, manifest hashing, rename, tracker. Before each read the files' pages are
dropped from the page cache (posix_fadvise DONTNEED after fsync), so reads come from the device, not
memory; `--warm-cache` skips that.

Stall: `--steps` real training steps (forward, backward, AdamW) with a save every `--save-every`
steps, in three loops: no saves, synchronous saves, `async_save=True`, repeated in `--repeats` rounds
(median shown). For each: the median step time, the time spent inside save calls (the stall), and for
async the final wait() (end of training). An async save copies the tensors after the save call returns
(pinned memory and a side stream on CUDA, the writer thread on the CPU); the first optimizer step after
it waits until the copies are done, and that wait counts in the async stall. The background writer shares the CPU cores with training,
so async steps slow down while it runs; the total loop time ("extra s" over the loop without saves)
shows that cost too. On a machine shared with other jobs, rerun: these are wall-clock times.

    .venv/bin/python bench/checkpoint_io.py            # ~0.7 GB state, 4 repeats, 6 steps saving every 3
    .venv/bin/python bench/checkpoint_io.py --quick    # ~30 MB state, 1 repeat, 4 steps saving every 2
    .venv/bin/python bench/checkpoint_io.py --dir /fast/nvme   # measure another filesystem
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# name: (num_layers, hidden_size, num_attention_heads, seq_length, vocab_size)
SHAPES = {
    "quick": (2, 256, 4, 64, 4096),
    "default": (4, 1024, 16, 256, 16384),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small state (~30 MB), 1 repeat, 4 steps")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds of save/load and of stall loops (default 4: each writer and reader goes first "
        "equally often; 1 quick)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per stall loop (default 6; 4)"
    )
    parser.add_argument("--save-every", type=int, default=None, help="save interval in steps (default 3; 2)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per training step")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp directory)")
    parser.add_argument("--warm-cache", action="store_true", help="read back from the page cache")
    parser.add_argument("--skip-stall", action="store_true", help="throughput only")
    args = parser.parse_args(argv)
    defaults = (1, 4, 2) if args.quick else (4, 6, 3)
    args.repeats = args.repeats or defaults[0]
    args.steps = args.steps or defaults[1]
    args.save_every = args.save_every or defaults[2]
    if min(args.repeats, args.steps, args.save_every) < 1:
        parser.error("--repeats, --steps and --save-every must be >= 1")
    if args.dir is not None and not Path(args.dir).is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    return args


# --------------------------------------------------------------------------------------------------
# the state to checkpoint


class State:
    """A model, its optimizer and scheduler: what a training run checkpoints."""

    def __init__(self, shape, seed: int = 0) -> None:
        from megatron.config import ModelConfig, OptimizerConfig
        from megatron.model import GPTModel
        from megatron.parallel.state import ParallelState
        from megatron.training.optimizer import build_optimizer
        from megatron.training.schedule import build_scheduler

        layers, hidden, heads, seq, vocab = shape
        self.model_config = ModelConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            attention_head_type="multiquery",
            seq_length=seq,
            max_position_embeddings=seq,
        )
        self.vocab_size = vocab
        self.parallel_state = ParallelState.single("cpu")
        self.model = GPTModel(self.model_config, vocab)
        self.model.init_weights(seed)
        optimizer_config = OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0)
        self.optimizer = build_optimizer(self.model, optimizer_config, parallel_state=self.parallel_state)
        self.scheduler = build_scheduler(
            self.optimizer, optimizer_config, train_iters=1000, train_samples=None, global_batch_size=1
        )

    def config_dict(self) -> dict:
        from megatron.config import Config

        return Config(model=self.model_config).to_dict()

    def train_step(self, micro_batch_size: int, seed: int) -> None:
        """One real training step (the first creates the Adam moments)."""
        from megatron.training.step import train_step

        train_step(self.model, self.optimizer, self.batch(micro_batch_size, seed), self.parallel_state)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a checkpoint writes in bulk: weights, masters (if separate), Adam moments."""
        found = [p.detach() for p in self.model.parameters()]
        if self.optimizer.main_params is not self.optimizer.model_params:
            found += [p.detach() for p in self.optimizer.main_params]
        for state in self.optimizer.optimizer.state.values():
            found += [v for key, v in state.items() if key != "step" and torch.is_tensor(v)]
        return found

    def batch(self, micro_batch_size: int, seed: int) -> list[dict]:
        seq = self.model_config.seq_length
        generator = torch.Generator().manual_seed(seed)
        data = torch.randint(0, self.vocab_size, (micro_batch_size, seq + 1), generator=generator)
        return [
            {
                "tokens": data[:, :-1],
                "labels": data[:, 1:],
                "loss_mask": torch.ones(micro_batch_size, seq),
                "position_ids": torch.arange(seq).expand(micro_batch_size, seq),
            }
        ]


# --------------------------------------------------------------------------------------------------
# throughput


def _drop_cache(path: Path) -> None:
    """Evict `path`'s (clean, fsynced) pages from the page cache, so the next read hits the device."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def plain_write(tensors: list[torch.Tensor], path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for tensor in tensors:
            handle.write(_bytes_view(tensor))
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - start


def plain_read(targets: list[torch.Tensor], path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        for tensor in targets:
            view = _bytes_view(tensor)
            done = 0
            while done < len(view):
                done += handle.readinto(view[done:])
    return time.perf_counter() - start


def checkpoint_save(state: State, root: Path, iteration: int) -> float:
    from megatron.checkpoint import Checkpointer

    checkpointer = Checkpointer(state.parallel_state)
    start = time.perf_counter()
    checkpointer.save(
        root,
        iteration,
        state.model,
        state.optimizer,
        state.scheduler,
        None,
        consumed_samples=0,
        config=state.config_dict(),
    )
    checkpointer.wait()
    return time.perf_counter() - start


def checkpoint_load(state: State, root: Path) -> float:
    from megatron.checkpoint import Checkpointer

    checkpointer = Checkpointer(state.parallel_state)
    start = time.perf_counter()
    loaded = checkpointer.load(root, state.model, state.optimizer, state.scheduler, None)
    seconds = time.perf_counter() - start
    assert loaded is not None, root
    return seconds


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_throughput(args, shape, workdir: Path) -> None:
    source = State(shape, seed=1)
    source.train_step(args.micro_batch_size, seed=0)
    target = State(shape, seed=2)  # loads land in other objects, as at a resume
    target.train_step(args.micro_batch_size, seed=1)
    tensors = source.tensors()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    num_params = sum(p.numel() for p in source.model.parameters())
    plain_targets = [torch.empty_like(t) for t in tensors]
    times: dict[str, list[float]] = {
        "plain write": [],
        "checkpoint save": [],
        "plain read": [],
        "plain read new": [],
        "checkpoint load": [],
    }
    disk_bytes = 0
    for repeat in range(args.repeats + 1):  # round 0 is not counted (below)
        plain = workdir / "plain.bin"
        root = workdir / f"ckpt{repeat}"
        # the same conditions for both writers: each starts with no dirty pages left by the other (a
        # write that follows another pays for its writeback) and with the other's pages dropped from
        # the page cache (as for the readers below), and they take turns going first
        writes = [
            ("plain write", lambda plain=plain: plain_write(tensors, plain)),
            ("checkpoint save", lambda root=root, it=repeat + 1: checkpoint_save(source, root, iteration=it)),
        ]
        for name, write in writes if repeat % 2 == 0 else writes[::-1]:
            os.sync()
            for written in (plain, root):
                if written.exists():
                    _drop_cache(written)
            times[name].append(write())
        disk_bytes = _dir_bytes(root)
        # the two readers also take turns going first, and both files' pages are dropped before each
        # read: the reader starts with the page cache the drop just freed (on a virtual machine, a
        # reader that needs more page cache than was freed pays for memory the host must back again:
        # whichever read second was up to 2x slower when both files were dropped once before the pair)
        reads = [
            ("plain read", lambda plain=plain: plain_read(plain_targets, plain)),
            ("checkpoint load", lambda root=root: checkpoint_load(target, root)),
            ("plain read new", lambda plain=plain: plain_read([torch.empty_like(t) for t in tensors], plain)),
        ]
        for name, read in reads[:2] if repeat % 2 == 0 else reads[1::-1]:
            if not args.warm_cache:
                _drop_cache(plain)
                _drop_cache(root)
            times[name].append(read())
        if not args.warm_cache:
            _drop_cache(plain)
        times["plain read new"].append(reads[2][1]())
        plain.unlink()
        shutil.rmtree(root)
    # the first round warms up both sides (imports, the process's first page-cache use: the plain side,
    # going first, ran up to 4x slower in it): dropped
    times = {name: values[1:] for name, values in times.items()}
    for a, b in zip(source.tensors(), target.tensors(), strict=True):
        assert torch.equal(a, b), "the loaded state differs from the saved one"
    print(
        f"state: {num_params / 1e6:.1f}M parameters (fp32): weights + Adam moments = {nbytes / 1e9:.3f} GB "
        f"in {len(tensors)} tensors; checkpoint on disk {disk_bytes / 1e9:.3f} GB"
    )
    cache = "page cache (--warm-cache)" if args.warm_cache else "device (page cache dropped before reads)"
    print(f"reads from: {cache}; median of {args.repeats}\n")
    print(f"{'operation':<18}{'seconds':>10}{'GB/s':>9}{'vs plain':>10}")
    for kind, reference in (("save", "plain write"), ("load", "plain read")):
        base = statistics.median(times[reference])
        for name in (reference, f"checkpoint {kind}"):
            seconds = statistics.median(times[name])
            print(f"{name:<18}{seconds:>10.3f}{nbytes / seconds / 1e9:>9.2f}{base / seconds:>9.2f}x")
    for kind, reference in (("save", "plain write"), ("load", "plain read"), ("load", "plain read new")):
        paired = [p / c for p, c in zip(times[reference], times[f"checkpoint {kind}"], strict=True)]
        print(
            f"checkpoint {kind} / {reference}, per repeat (each pair under the same conditions): "
            + " ".join(f"{r:.2f}" for r in paired)
            + f"; median {statistics.median(paired):.2f}x"
        )
    new = statistics.median(times["plain read new"])
    print(
        f"\n(plain read into newly allocated tensors, as a process that resumes reads: {new:.3f} s; the "
        f"checkpoint load is {new / statistics.median(times['checkpoint load']):.2f}x of that. The load "
        "reads each data file front to back straight into the model's parameters and Adam moments, the "
        "CRC32 of every byte checked as it is read.)"
    )


# --------------------------------------------------------------------------------------------------
# training stall


def training_loop(state: State, args, root: Path | None, async_save: bool) -> dict:
    """`args.steps` training steps, saving every `args.save_every` (none when `root` is None)."""
    from megatron.checkpoint import Checkpointer

    checkpointer = Checkpointer(state.parallel_state, async_save=async_save) if root else None
    step_seconds, save_seconds, fences = [], [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        begin = time.perf_counter()
        state.train_step(args.micro_batch_size, seed=step)
        step_seconds.append(time.perf_counter() - begin)
        if checkpointer is not None and step % args.save_every == 0:
            fences.append(checkpointer.fence_seconds)  # the previous save's fence is complete here
            begin = time.perf_counter()
            checkpointer.save(
                root,
                step,
                state.model,
                state.optimizer,
                state.scheduler,
                None,
                consumed_samples=step,
                config=state.config_dict(),
            )
            save_seconds.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    if checkpointer is not None:
        checkpointer.wait()
        fences.append(checkpointer.fence_seconds)
    final_wait = time.perf_counter() - begin
    # each save's stall: the save call, plus the wait of the next optimizer step for its copies
    fenced = [after - before for before, after in zip(fences, fences[1:])]
    return {
        "total": time.perf_counter() - start,
        "step": statistics.median(step_seconds),
        "saves": [call + fence for call, fence in zip(save_seconds, fenced, strict=True)],
        "fences": fenced,
        "final_wait": final_wait,
    }


def measure_stall(args, shape, workdir: Path) -> None:
    """`--repeats` rounds, each running the three loops in turn (so load from other processes on a
    shared machine hits all three alike); medians over the rounds."""
    state = State(shape, seed=1)
    state.train_step(args.micro_batch_size, seed=0)  # warm-up: kernels, allocations, Adam moments
    modes = (("no saves", None), ("sync save", False), ("async save", True))
    rounds: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for _ in range(args.repeats):
        for name, async_save in modes:
            root = None if async_save is None else workdir / name.replace(" ", "_")
            rounds[name].append(training_loop(state, args, root, bool(async_save)))
            if root is not None:
                shutil.rmtree(root)

    def median(name: str, key: str) -> float:
        return statistics.median(result[key] for result in rounds[name])

    def stalls(name: str) -> list[float]:
        return [seconds for result in rounds[name] for seconds in result["saves"]]

    base = median("no saves", "total")
    print(
        f"\ntraining stall: {args.steps} steps (micro batch {args.micro_batch_size} x seq {shape[3]}) with a "
        f"save every {args.save_every}; {len(stalls('sync save'))} saves per mode over {args.repeats} rounds"
        "\n(stall: time inside the save call, for async including the wait for the previous save and the\n"
        "next optimizer step's wait for the save's copies of the tensors, `Checkpointer.fence_seconds`)\n"
    )
    print(
        f"{'run':<12}{'step s':>9}{'stall/save s':>14}{'max stall s':>13}{'final wait s':>14}{'loop s':>9}{'extra s':>9}"
    )
    for name, _ in modes:
        saves = stalls(name)
        total = median(name, "total")
        print(
            f"{name:<12}{median(name, 'step'):>9.3f}{statistics.median(saves) if saves else 0.0:>14.3f}"
            f"{max(saves, default=0.0):>13.3f}{median(name, 'final_wait'):>14.3f}{total:>9.2f}{total - base:>9.2f}"
        )
    sync, asyn = stalls("sync save"), stalls("async save")
    if sync and asyn:
        ratio = statistics.median(asyn) / statistics.median(sync)
        print(f"\nasync stall per save is {ratio:.3f}x the sync save's (median)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES["quick" if args.quick else "default"]
    workdir = Path(tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir))
    print(f"writing under {workdir} ({args.threads} threads, torch {torch.__version__})")
    try:
        measure_throughput(args, shape, workdir)
        if not args.skip_stall:
            measure_stall(args, shape, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

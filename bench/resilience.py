"""Benchmark: what the resilience features cost a healthy run, as the ratio of the time per iteration with
each one on to the time with all of them off, measured in the same run.

- watchdog: `--hang-timeout-minutes` (a beat per activity, a daemon thread publishing to the store every
  few seconds); off is `--hang-timeout-minutes 0`.
- nan check: `--check-for-nan-in-loss-and-grad` (the L1 norm of every local gradient before its bucket's
  reduction, one fused pass on the device, and one slot per rank in the step's world all-reduce).
- straggler: `--log-straggler` (one all-gather of one float per rank at each log interval; the wait clock
  around blocking calls is always on, so it is in every variant).

Two gloo ranks (data parallel 2) train one model through the real loop (`build_run`, then `train` over
segments of --iters iterations, the flags switched between segments). Each round runs every variant once,
in an order rotated from round to round; a variant's time per iteration is the median over rounds of its
segment's wall time / iterations, so load from other processes lands on every variant alike. The model
(4 layers, hidden 256, seq 256, 8 query heads with one K/V head) takes about 100 ms an iteration here: a
tiny model's step would make any fixed cost look large.

The ratios carry the machine's noise (a few percent on a shared machine), more than the costs measured.
So each feature's own code is also timed inside the run (its calls wrapped with a clock, on rank 0) and
printed in microseconds per iteration: the absolute cost, which projects to a 15.5B step of several
seconds as cost / step time. The watchdog and straggler costs do not grow with the model; the nan
check's does (one pass over the local gradients), so it is also printed per million gradient elements.

    .venv/bin/python bench/resilience.py              # 6 rounds of 20 iterations per variant
    .venv/bin/python bench/resilience.py --quick      # 3 rounds of 10
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # spawned ranks import this file by path
    sys.path.insert(0, str(REPO_ROOT))

OFF = {"hang_timeout_minutes": 0.0, "check_for_nan_in_loss_and_grad": False, "log_straggler": False}
VARIANTS = {
    "off": {},
    "watchdog": {"hang_timeout_minutes": 30.0},
    "nan check": {"check_for_nan_in_loss_and_grad": True},
    "straggler": {"log_straggler": True},
    "all three": {
        "hang_timeout_minutes": 30.0,
        "check_for_nan_in_loss_and_grad": True,
        "log_straggler": True,
    },
}
# what each feature's own code is: (label, module, attribute path); wrapped with a clock on every rank
INSTRUMENTED = {
    "watchdog": [("beat", "megatron.training.watchdog", "Watchdog.beat")],
    "nan check": [
        ("bucket norms", "megatron.training.nonfinite", "LocalGradCheck._record"),
        ("flag", "megatron.training.nonfinite", "LocalGradCheck.local_flag"),
    ],
    "straggler": [("gather + report", "megatron.training.stragglers", "log_interval")],
}
MODEL_FLAGS = (
    "--num-layers 4 --hidden-size 128 --num-attention-heads 8 --attention-head-type multiquery "
    "--seq-length 128 --max-position-embeddings 128 --micro-batch-size 2 --global-batch-size 16 "
    "--lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --clip-grad 1.0 --fp32 --seed 1234 "
    "--attention-dropout 0.0 --hidden-dropout 0.0 --split 98,2,0 --tokenizer-type TokenizerFromFile "
    "--fim-rate 0.5 --num-workers 0 --eval-iters 0 --distributed-backend gloo"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds over the variants (default 6; 3 quick)"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="iterations per segment (default 20; 10 quick)"
    )
    parser.add_argument("--log-interval", type=int, default=5, help="log interval (the straggler gather's)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 iterations (noisier)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the corpus is built (default: temp)"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 6)
    args.iters = args.iters or (10 if args.quick else 20)
    return args


def load_tool(name: str):
    """Import tools/<name>.py (a script folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prepare_data(work_dir: Path) -> tuple[str, str]:
    """A corpus of standard-library .py files, a 1024-token tokenizer trained on it and the preprocessed
    dataset; (data prefix, tokenizer file)."""
    corpus, tokenizer, prefix = work_dir / "corpus.jsonl", work_dir / "tokenizer.json", work_dir / "corpus"
    if not tokenizer.exists():
        assert load_tool("make_demo_corpus").main(["--output", str(corpus), "--max-files", "120"]) == 0
        argv = ["--input", str(corpus), "--output", str(tokenizer), "--vocab-size", "1024", "--quiet"]
        assert load_tool("train_tokenizer").main(argv) == 0
        argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--json-keys", "content"]
        argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tokenizer)]
        assert load_tool("preprocess_data").main([*argv, "--append-eod", "--workers", "1", "--quiet"]) == 0
    return str(prefix) + "_content_document", str(tokenizer)


class Clock:
    """Calls and seconds of the wrapped functions, per label; a wrapped call made inside another one
    (the nan check's flag records the buckets still pending) counts as a call, its time only once."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._depth = 0

    def wrap(self, label: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                spent = time.perf_counter() - start if self._depth == 0 else 0.0
                self.seconds[label] = self.seconds.get(label, 0.0) + spent
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.calls), dict(self.seconds)


def instrument(clock: Clock) -> None:
    """Wrap each feature's own functions (INSTRUMENTED) with `clock`."""
    import importlib

    for feature, entries in INSTRUMENTED.items():
        for label, module_name, path in entries:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            setattr(owner, name, clock.wrap(f"{feature}: {label}", getattr(owner, name)))


def _set_variant(run, name: str) -> None:
    """The flags of variant `name`; the watchdog (built once per run) is rebuilt for its bound."""
    from megatron.training.watchdog import Watchdog

    for key, value in {**OFF, **VARIANTS[name]}.items():
        section = run.cfg.logging if key == "log_straggler" else run.cfg.training
        setattr(section, key, value)
    run.watchdog = Watchdog.for_run(run.cfg.training.hang_timeout_minutes, run.parallel_state)


def _segment(run, train, name: str, iters: int, clock: Clock) -> tuple[tuple[float, float], dict, dict]:
    """Train `iters` iterations with variant `name`: ((wall seconds, this process's CPU seconds), calls,
    seconds of the instrumented code)."""
    _set_variant(run, name)
    run.train_iters = run.state.iteration + iters
    calls, seconds = clock.snapshot()
    start, cpu = time.perf_counter(), time.process_time()
    train(run)
    elapsed = (time.perf_counter() - start, time.process_time() - cpu)
    after_calls, after_seconds = clock.snapshot()
    return (
        elapsed,
        {key: after_calls[key] - calls.get(key, 0) for key in after_calls},
        {key: after_seconds[key] - seconds.get(key, 0.0) for key in after_seconds},
    )


def _worker(argv: list[str], rounds: int, iters: int) -> dict:
    import torch

    from megatron.config import load_config
    from megatron.log import set_logging
    from megatron.parallel.state import ParallelState
    from megatron.training.train import build_run, train

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's all_gather_into_tensor rename
    clock = Clock()
    instrument(clock)
    cfg = load_config(argv)
    state = ParallelState.initialize(backend="gloo")
    set_logging(False)
    run = build_run(cfg, state)
    _segment(run, train, "all three", iters, clock)  # warm-up: allocations, the check's buffers
    names = list(VARIANTS)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    costs = {name: ({}, {}) for name in names}  # summed calls and seconds over rounds
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            (seconds, cpu), calls, spent = _segment(run, train, name, iters, clock)
            times[name].append(seconds / iters)
            cpu_times[name].append(cpu / iters)
            for key in calls:
                costs[name][0][key] = costs[name][0].get(key, 0) + calls[key]
                costs[name][1][key] = costs[name][1].get(key, 0.0) + spent[key]
    grad_elements = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    micro = _microbenchmarks(run, clock)
    state.destroy()
    return {"times": times, "cpu": cpu_times, "costs": costs, "grad_elements": grad_elements, "micro": micro}


def _per_call(function, repeats: int) -> float:
    """Seconds per call of `function()` over `repeats` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def _microbenchmarks(run, clock: Clock) -> dict:
    """Seconds per call of what runs per iteration or per log interval, measured alone: the clock's own
    wrapper (subtracted from the instrumented times), a watchdog beat, the wait clock around a blocking
    call, and the straggler gather + report with both ranks arriving together (in the loop, the gather
    also absorbs the time one rank waits for the other, which the next collective would absorb
    otherwise). Collective over the world group."""
    from megatron.parallel.collectives import COMM_TIMER, HOST_WAIT
    from megatron.training import stragglers
    from megatron.training.watchdog import Watchdog

    beat = Watchdog(0).beat
    wrapped = clock.wrap("calibration", lambda: None)
    gather = stragglers.gather_busy_ms

    def gather_and_report():
        stragglers.straggler_report(gather(1.0, run.parallel_state), threshold=0.2, minmax_count=1)

    def wait_clock():
        with COMM_TIMER.measure():
            pass

    before = HOST_WAIT.seconds
    result = {
        "wrapper": _per_call(wrapped, 20000) - _per_call(lambda: None, 20000),
        "beat": _per_call(lambda: beat(1, "forward/backward"), 20000),
        "wait clock": _per_call(wait_clock, 20000),
    }
    HOST_WAIT.seconds = before  # the calibration did not wait
    gather_and_report()  # both ranks arrive: the timed calls start together
    result["gather"] = _per_call(gather_and_report, 200)
    return result


def report(result: dict, rounds: int, iters: int, log_interval: int) -> None:
    times, costs, micro = result["times"], result["costs"], result["micro"]
    iterations = rounds * iters
    reference, cpu_reference = statistics.median(times["off"]), statistics.median(result["cpu"]["off"])
    print(f"\n{rounds} rounds x {iters} iterations per variant, 2 gloo ranks (data parallel 2), rank 0")
    print("medians over rounds; CPU: rank 0's process CPU time, less sensitive to other processes' load")
    header = f"{'variant':<11} {'ms/iteration':>12} {'ratio':>8} {'CPU ms':>8} {'ratio':>8}"
    print(f"{header}   own code per iteration (rank 0)")
    own_us = {}
    for name, samples in times.items():
        median, cpu = statistics.median(samples), statistics.median(result["cpu"][name])
        calls, spent = costs[name]
        parts = []
        for key in sorted(key for key in calls if calls[key]):
            net = max(spent[key] - calls[key] * micro["wrapper"], 0.0)  # the wrapper's own cost removed
            per_iteration = f"{calls[key] / iterations:.2f} calls, {1e6 * net / iterations:.1f} us"
            parts.append(f"{key.split(': ')[1]}: {per_iteration}")
            if key.split(": ")[0] == name:
                own_us[name] = own_us.get(name, 0.0) + 1e6 * net / iterations
        row = f"{name:<11} {1000 * median:>12.2f} {median / reference:>7.4f}x {1000 * cpu:>8.2f} "
        print(f"{row}{cpu / cpu_reference:>7.4f}x   {'; '.join(parts) or '-'}")
    print("\nmeasured alone (per call): " + ", ".join(f"{k} {1e6 * v:.2f} us" for k, v in micro.items()))
    gather_us = 1e6 * micro["gather"]
    rows = [
        ("watchdog", own_us.get("watchdog", 0.0), "beats, in every variant; + 2 threads waking 1/s"),
        ("nan check", own_us.get("nan check", 0.0), ""),
        ("straggler", gather_us / log_interval, f"one gather per log interval of {log_interval}"),
        ("straggler", gather_us / 100, "at the default --log-interval 100"),
    ]
    print("\nper-iteration cost, and against a 1 s / 5 s step (a 15.5B step takes several seconds):")
    for feature, us, note in rows:
        line = f"  {feature:<10} {us:>9.2f} us  {us / 1e4:.4f}% / {us / 5e4:.5f}%"
        if feature == "nan check":
            line += f"  ({us / (result['grad_elements'] / 1e6):.1f} us per million local gradient elements)"
        print(line + (f"  ({note})" if note else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.parallel.testing import run_distributed

    with tempfile.TemporaryDirectory() as temp:
        work_dir = args.work_dir or Path(temp)
        work_dir.mkdir(parents=True, exist_ok=True)
        prefix, tokenizer = prepare_data(work_dir)
        total = (args.rounds * len(VARIANTS) + 1) * args.iters
        argv = [*MODEL_FLAGS.split(), "--train-iters", str(total), "--log-interval", str(args.log_interval)]
        argv += [
            "--data-path",
            prefix,
            "--tokenizer-file",
            tokenizer,
            "--data-cache-path",
            str(work_dir / "cache"),
        ]
        load = os.getloadavg()
        results = run_distributed(_worker, 2, argv, args.rounds, args.iters, timeout=3600)
    report(results[0], args.rounds, args.iters, args.log_interval)
    print(f"load average (1 min) before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

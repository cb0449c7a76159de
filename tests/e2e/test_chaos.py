"""Chaos: one 2-rank job under `torchrun --max-restarts 4` with several faults drawn from a seeded random
generator (MEGATRON_FAULTS: kill, hang, data_hang, kill_in_save, slow, enospc, spike, nan) finishes with
status 0, one start marker per round in the metrics, and the same logged loss at every iteration and
the same final weights, bit for bit, as a fault-free run of the same layout run alongside. The one
documented difference: a loss spike or a non-finite gradient skips that iteration's update, so the
fault-free run is given those iterations as --iterations-to-skip (batch read, not trained on). The
default seed draws a hang, a kill, a spike, a NaN gradient, a slow rank and a full disk, data parallel.

Reproducible: the seed (MEGATRON_CHAOS_SEED, default CHAOS_SEED) and the drawn schedule are printed
(`pytest -s` shows them; a failure message holds them too). `draw_schedule` is a pure function of the
seed, and its rules are what make every drawn job finish:
- the fatal faults (kill, hang, data_hang, kill_in_save) each end one restart round: the k-th, in
  iteration order, fires in round k (`attempt=k`), so the job needs 1 + their number rounds;
- spike and nan fire in every round (`attempt=*`): an iteration re-run after a restart is skipped again,
  as in the fault-free run's --iterations-to-skip;
- slow and enospc fire in the first round only (a failed save leaves the previous checkpoint, and the
  run goes on: --on-save-failure continue).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args

CHAOS_SEED = 19
TRAIN_ITERS = 16
SAVE_INTERVAL = 4
SAVES = tuple(range(SAVE_INTERVAL, TRAIN_ITERS, SAVE_INTERVAL))  # 4, 8, 12 (16 is the final save)
HANG_TIMEOUT_MINUTES = 0.2  # 12 s without progress: the watchdog ends the rank (exit 3)
SPIKE_WINDOW = 3  # no spike decision before 3 accepted losses
FATAL_KINDS = ("kill", "hang", "data_hang", "kill_in_save")
HANG_KINDS = ("hang", "data_hang")  # each costs the watchdog's bound: at most one per job
LAYOUTS = {"tp2": "--tensor-model-parallel-size 2", "dp2": "--tensor-model-parallel-size 1"}
FLAGS = (
    f"--train-iters {TRAIN_ITERS} --save-interval {SAVE_INTERVAL} --log-interval 1 --eval-iters 0 "
    f"--lr-warmup-iters 2 --hang-timeout-minutes {HANG_TIMEOUT_MINUTES} --skip-nonfinite "
    f"--check-for-spiky-loss --spiky-loss-window {SPIKE_WINDOW} --on-save-failure continue "
    # no dropout: a skipped update still ran its forward, which draws dropout masks, and the fault-free
    # run's --iterations-to-skip does not (dropout across restarts is tests/e2e/test_restart.py's)
    "--attention-dropout 0 --hidden-dropout 0 --distributed-backend gloo"
)


@dataclass
class Schedule:
    """What `draw_schedule` drew: the MEGATRON_FAULTS items, the iterations whose update they skip, and
    the layout."""

    seed: int
    layout: str
    faults: list[str] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    num_fatal: int = 0

    def describe(self) -> str:
        return (
            f"chaos seed {self.seed} (MEGATRON_CHAOS_SEED), layout {self.layout}, "
            f"{self.num_fatal} restarts expected, skipped updates {self.skipped}\n  MEGATRON_FAULTS="
            + ";".join(self.faults)
        )


def draw_schedule(seed: int, kinds: tuple[str, ...]) -> Schedule:
    """Two fatal faults and every non-fatal kind in `kinds`, at iterations drawn by `random.Random(seed)`
    under the rules of the module docstring."""
    rng = random.Random(seed)
    schedule = Schedule(seed, rng.choice(sorted(LAYOUTS)))
    fatal = [kind for kind in FATAL_KINDS if kind in kinds]
    first = rng.choice(fatal)
    second = rng.choice([kind for kind in fatal if not (first in HANG_KINDS and kind in HANG_KINDS)])
    between = [i for i in range(3, TRAIN_ITERS) if i % SAVE_INTERVAL]  # kills between checkpoints
    chosen: list[tuple[int, str]] = []  # (iteration, kind)
    for kind in (first, second):
        pool = SAVES if kind == "kill_in_save" else between
        chosen.append((rng.choice([i for i in pool if i not in {c[0] for c in chosen}]), kind))
    for attempt, (iteration, kind) in enumerate(sorted(chosen)):  # the k-th fatal fault ends round k
        schedule.faults.append(f"{kind}:rank={rng.randrange(2)},iter={iteration},attempt={attempt}")
    schedule.num_fatal = len(chosen)
    fatal_iterations = {iteration for iteration, _ in chosen}
    free = [i for i in range(SPIKE_WINDOW + 2, TRAIN_ITERS + 1) if i not in fatal_iterations]
    if "spike" in kinds:  # every rank's loss: with TP the loss is not reduced over the TP ranks
        iteration = rng.choice(free)
        free.remove(iteration)
        schedule.faults.append(f"spike:iter={iteration},factor=1000,attempt=*")
        schedule.skipped.append(iteration)
    if "nan" in kinds:
        iteration = rng.choice(free)
        schedule.faults.append(f"nan:rank={rng.randrange(2)},iter={iteration},attempt=*")
        schedule.skipped.append(iteration)
    if "slow" in kinds:
        start = rng.randrange(1, TRAIN_ITERS - 2)
        schedule.faults.append(f"slow:rank={rng.randrange(2)},iter={start}-{start + 2},seconds=0.1")
    if "enospc" in kinds:
        iteration = rng.choice([i for i in SAVES if i not in fatal_iterations])
        schedule.faults.append(f"enospc:rank={rng.randrange(2)},iter={iteration}")
    schedule.skipped.sort()
    return schedule


def _torchrun(
    run_dir, dataset, tokenizer, schedule: Schedule, *extra: str, max_restarts: int = 0
) -> list[str]:
    # --standalone: the agent's store binds a port the OS picks, so two jobs never share a rendezvous
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--max-restarts", str(max_restarts), "-m", "megatron.pretrain"]
    flags = (TINY_RUN_FLAGS, FLAGS, LAYOUTS[schedule.layout], *extra)
    return command + pretrain_args(
        run_dir, dataset, tokenizer, *flags, metrics="metrics", save=True, load=True
    )


def _start(command: list[str], log_dir, env: dict) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as stdout, open(log_dir / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr)


def _finish(process: subprocess.Popen, log_dir, timeout: float) -> tuple[int, str, str]:
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = process.wait()
    return returncode, (log_dir / "stdout.txt").read_text(), (log_dir / "stderr.txt").read_text()


def _events(run_dir) -> list[dict]:
    """The records of the run's metrics file (a line a killed process left unfinished is skipped)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _losses(run_dir) -> dict[int, float]:
    """{iteration: lm loss} of the run's metrics, as one uninterrupted run would have logged them."""
    from megatron.training.metrics import read_metrics

    return {record["iteration"]: record["lm_loss"] for record in read_metrics(run_dir / "metrics.jsonl")}


def _final_weights(run_dir) -> dict:
    from megatron.checkpoint import load_full_state

    return load_full_state(run_dir / "ckpt" / f"iter_{TRAIN_ITERS:07d}", "model/")


CHAOS_KINDS = ("kill", "hang", "data_hang", "kill_in_save", "slow", "enospc", "spike", "nan")


def test_every_drawn_schedule_follows_the_rules():
    """What makes any seed's job finish (module docstring), over many seeds, and every item parses."""
    from megatron.config.faults import parse_faults

    layouts = set()
    for seed in range(300):
        schedule = draw_schedule(seed, CHAOS_KINDS)
        faults = parse_faults(";".join(schedule.faults))
        assert len(faults) == len(schedule.faults) == 6
        layouts.add(schedule.layout)
        fatal = [fault for fault in faults if fault.kind in FATAL_KINDS]
        assert [fault.attempt for fault in fatal] == [0, 1]  # one round each, in iteration order
        assert fatal[0].first < fatal[1].first
        assert sum(fault.kind in HANG_KINDS for fault in fatal) <= 1
        for fault in fatal:
            assert (fault.first in SAVES) == (fault.kind == "kill_in_save"), schedule.describe()
        fatal_iterations = {fault.first for fault in fatal}
        skips = [fault for fault in faults if fault.kind in ("spike", "nan")]
        assert sorted(fault.first for fault in skips) == schedule.skipped
        for fault in skips:
            assert fault.attempt is None and fault.first > SPIKE_WINDOW + 1  # every round, after the window
            assert fault.first not in fatal_iterations
        assert len(set(schedule.skipped)) == 2
        (enospc,) = [fault for fault in faults if fault.kind == "enospc"]
        assert enospc.attempt == 0 and enospc.first in SAVES and enospc.first not in fatal_iterations
    assert layouts == set(LAYOUTS)
    assert draw_schedule(7, CHAOS_KINDS) == draw_schedule(7, CHAOS_KINDS)  # a pure function of the seed


@pytest.mark.slow
def test_seeded_faults_end_with_the_fault_free_weights(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    seed = int(os.environ.get("MEGATRON_CHAOS_SEED", CHAOS_SEED))
    schedule = draw_schedule(seed, CHAOS_KINDS)
    print(schedule.describe())
    reference_dir, chaos_dir = tmp_path / "reference", tmp_path / "chaos"
    skip = ("--iterations-to-skip " + " ".join(map(str, schedule.skipped)),) if schedule.skipped else ()
    reference = _start(
        _torchrun(reference_dir, tiny_dataset_prefix, tiny_tokenizer_path, schedule, *skip),
        reference_dir,
        launch_env(),
    )
    chaos = _start(
        _torchrun(chaos_dir, tiny_dataset_prefix, tiny_tokenizer_path, schedule, max_restarts=4),
        chaos_dir,
        launch_env(MEGATRON_FAULTS=";".join(schedule.faults)),
    )
    status, out, err = _finish(chaos, chaos_dir, timeout=240)
    context = f"{schedule.describe()}\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-6000:]}"
    ref_status, ref_out, ref_err = _finish(reference, reference_dir, timeout=120)
    assert ref_status == 0, f"fault-free run: exit {ref_status}\n{ref_out[-3000:]}\n{ref_err[-3000:]}"
    assert status == 0, context

    # every fatal fault fired in its round, every skip fault at least once; the job restarted once per
    # fatal fault
    for fault in schedule.faults:
        kind, _, keys = fault.partition(":")
        iteration = dict(item.split("=") for item in keys.split(","))["iter"].split("-")[0]
        if kind in (*FATAL_KINDS, "spike", "nan"):
            assert f"injecting {kind} at iteration {iteration}" in err, f"{fault} never fired\n{context}"
    assert out.count("training done") == 1, context
    starts = [event["attempt"] for event in _events(chaos_dir) if event.get("event") == "start"]
    assert starts == list(range(schedule.num_fatal + 1)), f"start markers {starts}\n{context}"

    # every iteration's logged loss (the re-run's, after a restart) equals the fault-free run's, but for
    # the skipped ones: their loss is the spiked or a normal one there, none (not trained) in the reference
    chaos_losses, reference_losses = _losses(chaos_dir), _losses(reference_dir)
    assert list(chaos_losses) == list(reference_losses) == list(range(1, TRAIN_ITERS + 1)), context
    different = [
        i for i in chaos_losses if i not in schedule.skipped and chaos_losses[i] != reference_losses[i]
    ]
    assert not different, f"losses differ at iterations {different}\n{context}"

    chaos_weights, reference_weights = _final_weights(chaos_dir), _final_weights(reference_dir)
    assert chaos_weights.keys() == reference_weights.keys()
    different = [name for name in chaos_weights if not chaos_weights[name].equal(reference_weights[name])]
    assert not different, f"final weights differ from the fault-free run in {different}\n{context}"

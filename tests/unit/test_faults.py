"""MEGATRON_FAULTS: parsing, errors that say what is valid, matching by rank/iteration/attempt, fire-once
bookkeeping, and the hooks that need no process group (nan, spike, data_hang, the save faults)."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.config.faults import ENV, KINDS, FaultPlan, parse_faults
from megatron.data.loader import build_pretraining_data_loader
from megatron.training.faults import Faults

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_parses_the_documented_example():
    faults = parse_faults(
        "kill:rank=1,iter=10;slow:rank=1,iter=3-8,seconds=0.5;nan:rank=0,iter=7;spike:iter=12,factor=50"
    )
    assert [(f.kind, f.rank, f.first, f.last) for f in faults] == [
        ("kill", 1, 10, 10),
        ("slow", 1, 3, 8),
        ("nan", 0, 7, 7),
        ("spike", None, 12, 12),
    ]
    assert faults[1].seconds == 0.5 and faults[3].factor == 50.0
    assert all(f.attempt == 0 for f in faults)
    assert parse_faults("kill:iter=3,attempt=*")[0].attempt is None
    assert parse_faults("nan:iter=2,param=dense_4h")[0].param == "dense_4h"
    assert parse_faults(" ; ") == [] and parse_faults(None) == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("explode:iter=3", "unknown kind 'explode'"),
        ("kill:rank=1", "kill needs iter"),
        ("kill:iter=0", "iter=0 must be >= 1"),
        ("kill:iter=x", "iter='x' is not an integer"),
        ("kill:iter=5-3", "the range ends before it starts"),
        ("kill:iter=3,rank=-1", "rank=-1 must be >= 0"),
        ("kill:iter=3,colour=red", "'colour=red' is not one of the keys"),
        ("kill:iter=3,seconds=1", "kill takes no seconds"),
        ("slow:iter=3", "slow needs seconds"),
        ("slow:iter=3,seconds=0", "seconds=0 must be > 0"),
        ("spike:iter=3,factor=big", "factor='big' is not a number"),
        ("kill:iter=3,iter=4", "iter given twice"),
        ("kill:iter=3,attempt=first", "attempt='first' is not an integer"),
    ],
)
def test_bad_specs_name_the_variable_and_what_is_valid(text, why):
    with pytest.raises(ValueError) as error:
        FaultPlan.from_env({ENV: f"slow:iter=1,seconds=1;{text}"})
    message = str(error.value)
    assert message.startswith(f"{ENV}: {text!r}: ")
    assert why in message
    assert all(kind in message for kind in KINDS)
    assert "rank, iter, attempt, seconds, factor, param" in message


def test_unset_is_inactive_and_attempt_comes_from_torchrun():
    assert not FaultPlan.from_env({}).active
    assert not FaultPlan.from_env({ENV: ""}).active
    plan = FaultPlan.from_env({ENV: "kill:iter=3", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert plan.attempt == 1 and not plan.active  # attempt 0 only: nothing left to fire in round 1
    assert plan.fire("kill", 3, 0) is None
    plan = FaultPlan.from_env({ENV: "kill:iter=3,attempt=*", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert plan.active and plan.fire("kill", 3, 0) is not None


def test_matching_by_rank_iteration_and_kind_records_each_firing():
    plan = FaultPlan(parse_faults("slow:rank=1,iter=3-5,seconds=1;kill:iter=4"))
    assert plan.fire("slow", 3, 0) is None  # another rank
    assert plan.fire("slow", 2, 1) is None  # before the range
    assert plan.fire("kill", 3, 1) is None  # another kind's iteration
    fired = [it for it in range(1, 8) if plan.fire("slow", it, 1) is not None]
    assert fired == [3, 4, 5]
    assert plan.faults[0].fired == [3, 4, 5]
    assert plan.fire("kill", 4, 0) is plan.faults[1] and plan.fire("kill", 4, 7) is plan.faults[1]
    assert plan.faults[1].fired == [4, 4]


def test_save_faults_fire_once_at_the_first_save_at_or_after_n_or_in_every_save_of_a_range():
    plan = FaultPlan(parse_faults("enospc:rank=0,iter=5"))
    assert plan.fire("enospc", 4, 0) is None
    assert plan.fire("enospc", 6, 1) is None  # another rank
    assert plan.fire("enospc", 6, 0) is not None
    assert plan.fire("enospc", 8, 0) is None  # once
    ranged = FaultPlan(parse_faults("enospc:iter=4-8"))
    assert [it for it in (2, 4, 6, 8, 10) if ranged.fire("enospc", it, 3)] == [4, 6, 8]


def test_in_save_raises_enospc_naming_the_path(tmp_path):
    plan = FaultPlan(parse_faults("enospc:rank=1,iter=2"))
    plan.in_save(2, 0, tmp_path)  # another rank: nothing
    with pytest.raises(OSError) as error:
        plan.in_save(4, 1, tmp_path)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path)
    assert "No space left on device" in str(error.value)
    plan.in_save(6, 1, tmp_path)  # fired already


def _run(model, iteration: int, rank: int = 0):
    return SimpleNamespace(
        state=SimpleNamespace(iteration=iteration - 1),
        parallel_state=SimpleNamespace(rank=rank, backend=None, device=torch.device("cpu")),
        model=model,
    )


def test_nan_replaces_the_named_parameters_local_gradient_in_its_iteration_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    faults = Faults(parse_faults("nan:rank=0,iter=2,param=1.weight"))
    x = torch.randn(5, 3)
    for iteration, rank in ((1, 0), (2, 1), (2, 0), (3, 0)):
        model.zero_grad()
        faults.at_iteration_start(_run(model, iteration, rank))
        model(x).sum().backward()
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
        assert bad == (["1.weight"] if (iteration, rank) == (2, 0) else []), (iteration, rank)
    assert faults.faults[0].fired == [2]
    default = Faults(parse_faults("nan:iter=1"))  # the first parameter, every rank
    model.zero_grad()
    default.at_iteration_start(_run(model, 1))
    model(x).sum().backward()
    assert [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()] == ["0.weight"]


def test_spike_scales_the_loss_of_its_iteration_once():
    faults = Faults(parse_faults("spike:iter=3,factor=50"))
    model = torch.nn.Linear(1, 1)
    loss = torch.tensor(2.0)
    faults.at_iteration_start(_run(model, 2))
    assert faults.scale_loss(loss).item() == 2.0
    faults.at_iteration_start(_run(model, 3))
    assert faults.scale_loss(loss).item() == 100.0
    assert faults.scale_loss(loss).item() == 2.0  # once per iteration (evaluation is never scaled)


class _Samples:
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> np.ndarray:
        return np.full(5, index, dtype=np.int64)


def test_data_hang_wraps_only_its_rank_and_blocks_on_exactly_its_iterations_samples():
    faults = Faults(parse_faults("data_hang:rank=1,iter=3"))
    dataset = _Samples()
    assert faults.wrap_dataset(dataset, samples_per_iteration=4, rank=0) is dataset
    assert Faults([]).wrap_dataset(dataset, samples_per_iteration=4, rank=1) is dataset
    wrapped = faults.wrap_dataset(dataset, samples_per_iteration=4, rank=1)
    assert len(wrapped) == 40 and (wrapped.first, wrapped.last) == (8, 12)  # iteration 3 = samples 8..11
    # a data-parallel rank of size 2, micro-batch 2: iteration 3 is the loader's third batch
    loader = build_pretraining_data_loader(
        wrapped,
        consumed_samples=0,
        micro_batch_size=2,
        data_parallel_rank=1,
        data_parallel_size=2,
        num_workers=0,
        eod=0,
    )
    batches = iter(loader)
    assert [next(batches)["tokens"][:, 0].tolist() for _ in range(2)] == [[2, 3], [6, 7]]
    blocked = []
    wrapped._block = blocked.append  # what would block forever
    next(batches)
    assert blocked == [10, 11]


@pytest.mark.parametrize(
    "code",
    [
        "FaultPlan(parse_faults('kill_in_save:rank=0,iter=2')).in_save(4, 0)",
        "Faults(parse_faults('kill:iter=3')).at_iteration_start(_run(None, 3))",
    ],
)
def test_kill_and_kill_in_save_sigkill_the_process_and_say_so(code):
    script = (
        "from tests.unit.test_faults import _run\n"
        "from megatron.config.faults import FaultPlan, parse_faults\n"
        "from megatron.training.faults import Faults\n"
        f"{code}\n"
        "print('survived')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert "survived" not in result.stdout
    assert "[rank 0] MEGATRON_FAULTS: injecting kill" in result.stderr

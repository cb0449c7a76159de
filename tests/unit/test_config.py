"""Config: dataclass defaults, flags and YAML, precedence, validation messages, presets."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron.config import (
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    build_parser,
    check_vocab_size,
    load_config,
    parse_config,
)
from megatron.config.presets import preset_names
from tests.starcoder_flags import STARCODER_FLAGS as STARCODER_FLAG_TEXT

REPO = Path(__file__).resolve().parents[2]

STARCODER_FLAGS = STARCODER_FLAG_TEXT.split()


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A data prefix with its .idx and a tokenizer file; WORLD_SIZE unset (= 1)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "corpus.idx").write_bytes(b"")
    (tmp_path / "corpus.bin").write_bytes(b"")
    (tmp_path / "tok.json").write_text("{}")
    return {"prefix": str(tmp_path / "corpus"), "tokenizer": str(tmp_path / "tok.json"), "dir": tmp_path}


def tiny_argv(inputs, **overrides) -> list[str]:
    """A small valid command line; overrides replace or (value None) drop flags."""
    flags = {
        "num-layers": "2",
        "hidden-size": "64",
        "num-attention-heads": "4",
        "seq-length": "32",
        "micro-batch-size": "2",
        "global-batch-size": "4",
        "lr": "1e-3",
        "train-iters": "10",
        "data-path": inputs["prefix"],
        "tokenizer-file": inputs["tokenizer"],
    }
    flags.update({key.replace("_", "-"): value for key, value in overrides.items()})
    argv = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", *([] if value is True else str(value).split())]
    return argv


def expect_exit(capsys, argv) -> str:
    """parse_config must exit with status 2 and one `error:` line; returns the line."""
    with pytest.raises(SystemExit) as info:
        parse_config(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


# ---------------------------------------------------------------- dataclasses and defaults


def test_model_config_is_directly_usable():
    model = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32
    )
    model.validate()
    assert (model.ffn_hidden_size, model.kv_channels) == (256, 16)
    assert model.attention_head_type == "multihead" and model.num_key_value_heads == 4
    assert (
        ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4).max_position_embeddings
        == 4
    )
    explicit = ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=100, kv_channels=8)
    assert (explicit.ffn_hidden_size, explicit.kv_channels) == (100, 8)


def test_contract_defaults(inputs):
    cfg = load_config(tiny_argv(inputs, global_batch_size=None))
    expected = {
        "model": dict(
            attention_head_type="multihead",
            make_vocab_size_divisible_by=128,
            init_method_std=0.02,
            attention_dropout=0.1,
            hidden_dropout=0.1,
            layernorm_epsilon=1e-5,
            untie_embeddings_and_output_weights=False,
            activation="gelu_tanh",
            use_flash_attn=False,
            attention_softmax_in_fp32=True,
            max_position_embeddings=32,
            recompute_granularity=None,
            recompute_method=None,
            recompute_num_layers=None,
            checkpoint_activations=False,
        ),
        "parallel": dict(
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            sequence_parallel=False,
            use_distributed_optimizer=False,
            overlap_grad_reduce=False,
            ddp_bucket_size=None,
            check_replicas_interval=0,
            distributed_timeout_minutes=10,
            distributed_backend=None,
            num_layers_per_virtual_pipeline_stage=None,
            decoder_first_pipeline_num_layers=None,
            decoder_last_pipeline_num_layers=None,
        ),
        "data": dict(
            split="969, 30, 1",
            tokenizer_type="TokenizerFromFile",
            fim_rate=0.0,
            fim_spm_rate=0.5,
            fragment_fim_rate=0.5,
            fim_split_sample=None,
            data_cache_path=None,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            num_workers=2,
        ),
        "optimizer": dict(
            optimizer="adam",
            min_lr=0.0,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_eps=1e-8,
            clip_grad=1.0,
            lr_decay_style="linear",
            lr_decay_iters=10,  # = train_iters
            lr_warmup_iters=0,
            lr_warmup_fraction=None,
            lr_warmup_samples=0,
            loss_scale=None,
            initial_loss_scale=2.0**32,
            min_loss_scale=1.0,
            loss_scale_window=1000,
            hysteresis=2,
        ),
        "training": dict(
            global_batch_size=2,  # micro x data-parallel size
            train_samples=None,
            eval_interval=1000,
            eval_iters=100,
            seed=1234,
            fp16=False,
            bf16=False,
            fp32=False,
            skip_nonfinite=False,
            exit_interval=None,
            dry_run=False,
            dry_run_gpu="A100",
            dry_run_mfu=0.4,
        ),
        "checkpoint": dict(
            save=None, load=None, save_interval=None, finetune=False, no_load_optim=False, no_load_rng=False
        ),
        "logging": dict(log_interval=100, metrics_jsonl=None, tensorboard_dir=None, wandb_project_name=None),
    }
    for section, values in expected.items():
        for name, value in values.items():
            assert getattr(getattr(cfg, section), name) == value, (section, name)
    assert cfg.model.ffn_hidden_size == 256 and cfg.model.kv_channels == 16
    assert cfg.training.precision == "fp32" and cfg.data_parallel_size == 1


def test_metrics_jsonl_defaults_under_save(inputs):
    cfg = load_config(tiny_argv(inputs, save=str(inputs["dir"] / "ckpt")))
    assert cfg.logging.metrics_jsonl == str(inputs["dir"] / "ckpt" / "metrics.jsonl")


def test_no_torch_import_and_fast_failure(inputs):
    code = (
        "import sys, time; t = time.time()\n"
        "from megatron.config import load_config, ConfigError\n"
        f"try: load_config({tiny_argv(inputs, hidden_size=100, num_attention_heads=3)!r})\n"
        "except ConfigError: pass\n"
        "assert 'torch' not in sys.modules, 'megatron.config must not import torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------- flags


def test_every_flag_has_help_and_megatron_name():
    parser = build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    for action in parser._actions:
        assert action.help, action.option_strings
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in options, (name, f.name)
    for compat in ("--openai-gelu", "--no-attention-softmax-in-fp32", "--DDP-impl", "--no-bias-gelu-fusion"):
        assert compat in options


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--num-attention-heads" in out and "--fim-rate" in out and "model:" in out


def test_bool_list_and_const_flags(inputs):
    argv = tiny_argv(inputs, data_path=f"0.3 {inputs['prefix']} 0.7 {inputs['prefix']}")
    argv += ["--openai-gelu", "--no-attention-softmax-in-fp32", "--eod-mask-loss", "--activation", "gelu"]
    cfg = load_config(argv)
    assert cfg.data.data_path == ["0.3", inputs["prefix"], "0.7", inputs["prefix"]]
    assert cfg.model.activation == "gelu"  # the later flag wins
    assert cfg.model.attention_softmax_in_fp32 is False and cfg.data.eod_mask_loss is True
    assert load_config(tiny_argv(inputs) + ["--openai-gelu"]).model.activation == "gelu_tanh"


def test_recompute_flags_and_megatron_aliases(inputs):
    model = load_config(tiny_argv(inputs, recompute_activations=True)).model
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == (
        "selective",
        None,
        None,
    )
    model = load_config(tiny_argv(inputs, checkpoint_activations=True)).model
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    argv = tiny_argv(inputs, checkpoint_activations=True, recompute_method="block", recompute_num_layers=2)
    model = load_config(argv).model
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    argv = tiny_argv(inputs, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    cfg = load_config(argv)
    assert cfg.model.recompute_num_layers == 2 and not cfg.no_effect_flags
    assert not any("recompute" in note for note in cfg.notes(device_type="cpu"))


def test_pipeline_split_is_validated_for_every_stage(inputs):
    argv = tiny_argv(inputs, num_layers=10, pipeline_model_parallel_size=4, global_batch_size=2)
    argv += ["--decoder-first-pipeline-num-layers", "1"]
    par = load_config(argv, world_size=4).parallel
    assert (par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers) == (1, None)
    argv = tiny_argv(inputs, num_layers=8, pipeline_model_parallel_size=2, global_batch_size=2)
    cfg = load_config(argv + ["--num-layers-per-virtual-pipeline-stage", "2"], world_size=2)
    assert cfg.parallel.num_layers_per_virtual_pipeline_stage == 2
    with pytest.raises(
        ConfigError, match="--num-layers 8 is not divisible by --pipeline-model-parallel-size 2"
    ):
        load_config(argv + ["--num-layers-per-virtual-pipeline-stage", "3"], world_size=2)


def test_no_effect_flags_are_reported_in_notes(inputs):
    argv = tiny_argv(inputs) + [
        "--DDP-impl",
        "local",
        "--no-gradient-accumulation-fusion",
        "--use-flash-attn",
    ]
    argv += ["--kill-switch-path", "/tmp/kill", "--structured-logs", "--log-params-norm"]
    cfg = load_config(argv)
    assert cfg.logging.log_params_norm  # a real flag now: no note about it
    assert not any(note.startswith("--log-params-norm") for note in cfg.notes(device_type="cpu"))
    notes = cfg.notes(device_type="cpu")
    assert cfg.no_effect_flags["DDP-impl"] == "local"
    for flag_name in (
        "--DDP-impl local",
        "--no-gradient-accumulation-fusion",
        "--kill-switch-path /tmp/kill",
    ):
        assert any(note.startswith(flag_name) and "no effect" in note for note in notes), flag_name
    assert any("--use-flash-attn has no effect on CPU" in note for note in notes)
    assert not any(
        "--use-flash-attn" in note for note in load_config(tiny_argv(inputs)).notes(device_type="cpu")
    )


def test_junk_flag_is_rejected(capsys, inputs):
    line = expect_exit(capsys, [*tiny_argv(inputs), "--made-up-flag", "3"])
    assert "--made-up-flag" in line
    line = expect_exit(capsys, [*tiny_argv(inputs), "stray"])
    assert "stray" in line


def test_abbreviated_flag_is_rejected(capsys, inputs):
    line = expect_exit(capsys, [*tiny_argv(inputs), "--num-lay", "3"])
    assert "--num-lay" in line and "--num-layers" in line


# ---------------------------------------------------------------- YAML


def write_yaml(path: Path, values) -> str:
    path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
    return str(path)


def test_yaml_cli_precedence(inputs):
    tmp = inputs["dir"]
    base = write_yaml(
        tmp / "base.yaml",
        "num_layers: 3\nhidden-size: 64\nnum-attention-heads: 4\nseq-length: 32\n"
        "lr: 1e-3\nmin_lr: 1e-4\ntrain-iters: 20\nfim-rate: 0.25\n"
        f"data-path: {inputs['prefix']}\ntokenizer-file: {inputs['tokenizer']}\n",
    )
    nested = write_yaml(tmp / "nested.yaml", {"model": {"num-layers": 6}, "training": {"train_iters": 30}})
    cfg = load_config(["--config", base, "--config", nested, "--train-iters", "40"])
    assert cfg.model.num_layers == 6  # later file over earlier file
    assert cfg.training.train_iters == 40  # CLI over files
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.min_lr == 1e-4  # PyYAML reads 1e-3 as a string
    assert cfg.data.fim_rate == 0.25 and cfg.data.data_path == [inputs["prefix"]]
    assert cfg.optimizer.lr_decay_iters == 40
    assert cfg.model.hidden_dropout == 0.1  # untouched default


def test_yaml_booleans_and_nulls(inputs):
    path = write_yaml(
        inputs["dir"] / "b.yaml",
        {
            "attention-softmax-in-fp32": False,
            "openai-gelu": True,
            "fim-split-sample": None,
            "sequence-parallel": True,
        },
    )
    cfg = load_config(["--config", path, *tiny_argv(inputs)])
    assert cfg.model.attention_softmax_in_fp32 is False and cfg.parallel.sequence_parallel is True
    assert cfg.model.activation == "gelu_tanh"


def test_unknown_yaml_key_names_file_and_suggestion(capsys, inputs):
    path = write_yaml(inputs["dir"] / "typo.yaml", {"num-attention-head": 4})
    line = expect_exit(capsys, ["--config", path, *tiny_argv(inputs)])
    assert path in line and "num-attention-head" in line and "did you mean num-attention-heads" in line


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("num-layers", "four", ["num-layers", "expected int", "four"]),
        ("lr", [1, 2], ["lr", "expected float"]),
        ("bf16", "yes", ["bf16", "true or false"]),
        ("attention-head-type", "mqa", ["attention-head-type", "multiquery"]),
        ("num-layers", None, ["num-layers", "required"]),
    ],
)
def test_yaml_wrong_type_names_key_and_file(capsys, inputs, key, value, words):
    path = write_yaml(inputs["dir"] / "bad.yaml", {key: value})
    line = expect_exit(capsys, ["--config", path, *tiny_argv(inputs, **{key: None})])
    for word in words if value is None else [path, *words]:
        assert word in line, (word, line)


def test_invalid_yaml_and_missing_config(capsys, inputs):
    bad = write_yaml(inputs["dir"] / "broken.yaml", "num-layers: [1,\n")
    assert bad in expect_exit(capsys, ["--config", bad])
    line = expect_exit(capsys, ["--config", "tiny-cpuu"])
    assert "did you mean tiny-cpu" in line
    assert "does not exist" in expect_exit(capsys, ["--config", str(inputs["dir"] / "nope.yaml")])


def test_to_yaml_round_trip(inputs):
    argv = tiny_argv(inputs, save=str(inputs["dir"] / "ckpt")) + ["--fim-rate", "0.5", "--bf16"]
    cfg = load_config(argv)
    path = write_yaml(inputs["dir"] / "saved.yaml", cfg.to_yaml())
    again = load_config(["--config", path])
    assert again.to_dict() == cfg.to_dict()
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="unknown model settings .'num_layer'"):
        Config.from_dict({"model": {"num_layer": 2}})


def test_config_module_prints_a_loadable_config(capsys, inputs):
    from megatron.config.__main__ import main

    assert (
        main(
            ["--config", "tiny-cpu", "--data-path", inputs["prefix"], "--tokenizer-file", inputs["tokenizer"]]
        )
        == 0
    )
    printed = capsys.readouterr().out
    path = write_yaml(inputs["dir"] / "printed.yaml", printed)
    assert (
        load_config(["--config", path]).to_dict()
        == load_config(["--config", "tiny-cpu", "--config", path]).to_dict()
    )
    assert yaml.safe_load(printed)["num-layers"] == 4


# ---------------------------------------------------------------- bad input: exit 2, flag and valid choice named

BAD_INPUTS = [
    (
        dict(hidden_size=100, num_attention_heads=3),
        ["--hidden-size 100", "--num-attention-heads 3", "valid head counts"],
    ),
    (
        dict(seq_length=64, max_position_embeddings=32),
        ["--seq-length 64", "--max-position-embeddings 32", "<= 32"],
    ),
    (
        dict(global_batch_size=6, micro_batch_size=4),
        ["--global-batch-size 6", "--micro-batch-size 4", "multiple of 4"],
    ),
    (dict(min_lr=0.01), ["--min-lr 0.01", "--lr 0.001", "<= 0.001"]),
    (dict(data_path=None), ["--data-path", "--train-weighted-split-paths-path"]),
    (dict(data_path="/nonexistent/corpus"), ["--data-path /nonexistent/corpus", "corpus.idx does not exist"]),
    (dict(tokenizer_file=None), ["--tokenizer-type TokenizerFromFile", "--tokenizer-file"]),
    (
        dict(tokenizer_file="/nonexistent/tok.json"),
        ["--tokenizer-file /nonexistent/tok.json", "does not exist"],
    ),
    (dict(num_layrs=4), ["--num-layrs", "did you mean --num-layers"]),
    (dict(attention_head_type="mqa"), ["--attention-head-type", "multiquery"]),
    (
        dict(tensor_model_parallel_size=3),
        ["--num-attention-heads 4", "--tensor-model-parallel-size 3", "1, 2, 4"],
    ),
    (
        dict(seq_length=33, tensor_model_parallel_size=2, sequence_parallel=True),
        ["--seq-length 33", "--tensor-model-parallel-size 2", "--sequence-parallel"],
    ),
    (dict(ddp_bucket_size=0), ["--ddp-bucket-size 0", "> 0"]),
    (
        dict(num_layers=10, pipeline_model_parallel_size=4, global_batch_size=2),
        [
            "--num-layers 10",
            "--pipeline-model-parallel-size 4",
            "such as 8 or 12",
            "--decoder-first-pipeline-num-layers 1",
        ],
    ),
    (
        dict(num_layers=10, pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=2),
        [
            "--num-layers 10",
            "--decoder-first-pipeline-num-layers 2",
            "valid --decoder-first-pipeline-num-layers",
        ],
    ),
    (
        dict(
            num_layers=8,
            pipeline_model_parallel_size=2,
            decoder_first_pipeline_num_layers=3,
            decoder_last_pipeline_num_layers=3,
        ),
        ["--decoder-first-pipeline-num-layers 3", "--decoder-last-pipeline-num-layers 3", "add up to 8"],
    ),
    (
        dict(
            num_layers=8,
            pipeline_model_parallel_size=2,
            num_layers_per_virtual_pipeline_stage=1,
            decoder_last_pipeline_num_layers=3,
        ),
        [
            "--num-layers-per-virtual-pipeline-stage",
            "--decoder-last-pipeline-num-layers",
            "cannot be combined",
        ],
    ),
    (
        dict(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3),
        ["--num-layers 8", "--num-layers-per-virtual-pipeline-stage 3", "= 6", "1, 2, 4"],
    ),
    (dict(decoder_first_pipeline_num_layers=1), ["--decoder-first-pipeline-num-layers", ">= 2, got 1"]),
    (dict(decoder_last_pipeline_num_layers=0), ["--decoder-last-pipeline-num-layers 0", "> 0"]),
    (
        dict(recompute_granularity="full"),
        ["--recompute-granularity full", "--recompute-method uniform or block"],
    ),
    (
        dict(recompute_granularity="full", recompute_method="block"),
        ["--recompute-num-layers", "between 1 and --num-layers 2", "missing"],
    ),
    (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
        ["--recompute-num-layers", "between 1 and --num-layers 2", "got 3"],
    ),
    (
        dict(recompute_granularity="selective", recompute_method="uniform"),
        [
            "--recompute-method uniform",
            "needs --recompute-granularity full",
            "not --recompute-granularity selective",
        ],
    ),
    (dict(recompute_num_layers=1), ["--recompute-num-layers 1", "needs --recompute-granularity full"]),
    (dict(recompute_method="chunked"), ["--recompute-method", "uniform", "block"]),
    (
        dict(checkpoint_activations=True, recompute_granularity="selective"),
        ["--checkpoint-activations", "--recompute-granularity selective", "drop one"],
    ),
    (dict(check_replicas_interval=-1), ["--check-replicas-interval -1", ">= 0"]),
    (
        dict(lr_warmup_fraction=0.1, lr_warmup_iters=5),
        ["--lr-warmup-fraction", "--lr-warmup-iters", "only one"],
    ),
    (dict(train_samples=100), ["--train-iters", "--train-samples", "both"]),
    (dict(train_iters=None), ["--train-iters", "--train-samples", "neither"]),
    (dict(fp16=True, bf16=True), ["--fp16 and --bf16", "choose one"]),
    (dict(fim_rate=1.5), ["--fim-rate 1.5", "[0.0, 1.0]"]),
    (dict(lr=None), ["--lr is required"]),
    (dict(lr="nan"), ["--lr nan", "finite"]),
    (dict(data_path="1.0 a 2.0"), ["--data-path", "WEIGHT PREFIX"]),
    (dict(valid_weighted_split_paths_path="v.txt", data_path=None), ["--train-weighted-split-paths-path"]),
    (dict(valid_weighted_split_paths_path="v.txt"), ["either --data-path", "not both"]),
]


@pytest.mark.parametrize("overrides, words", BAD_INPUTS)
def test_bad_input_exits_2_naming_flag(capsys, inputs, overrides, words):
    line = expect_exit(capsys, tiny_argv(inputs, **overrides))
    for word in words:
        assert word in line, (word, line)


def test_data_prefix_with_suffix_gets_a_hint(capsys, inputs):
    line = expect_exit(capsys, tiny_argv(inputs, data_path=inputs["prefix"] + ".bin"))
    assert f"give the prefix without the suffix: {inputs['prefix']}" in line


def test_world_size_checks(capsys, inputs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    line = expect_exit(capsys, tiny_argv(inputs, tensor_model_parallel_size=4))
    assert "world size 6" in line and "--tensor-model-parallel-size 4" in line
    line = expect_exit(capsys, tiny_argv(inputs))  # data parallel 6: 4 % (2 x 6)
    assert "data-parallel size 6 = 12" in line and "multiple of 12" in line
    cfg = load_config(tiny_argv(inputs, global_batch_size=24))
    assert cfg.data_parallel_size == 6 and cfg.world_size == 6
    monkeypatch.setenv("WORLD_SIZE", "zero")
    assert "WORLD_SIZE" in expect_exit(capsys, tiny_argv(inputs))


BAD_SUBPROCESS = [
    (dict(hidden_size=100, num_attention_heads=3), "--num-attention-heads 3"),
    (dict(seq_length=64, max_position_embeddings=32), "--max-position-embeddings 32"),
    (dict(global_batch_size=6, micro_batch_size=4), "--global-batch-size 6"),
    (dict(min_lr=0.01), "--min-lr 0.01"),
    (dict(data_path="/nonexistent/corpus"), "--data-path /nonexistent/corpus"),
    (dict(tokenizer_file="/nonexistent/tok.json"), "--tokenizer-file /nonexistent/tok.json"),
    (dict(num_layrs=4), "did you mean --num-layers"),
]


def run_timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command; best wall time of two tries (the 2 CPU cores are shared with other tests)."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        if best < 2.0:
            break
    return result, best


@pytest.mark.parametrize("overrides, word", BAD_SUBPROCESS)
def test_bad_input_from_the_command_line_is_fast(inputs, overrides, word):
    code = "from megatron.config import parse_config; parse_config()"
    result, seconds = run_timed([sys.executable, "-c", code, *tiny_argv(inputs, **overrides)])
    assert result.returncode == 2, result.stderr
    assert word in result.stderr and "error:" in result.stderr
    assert seconds < 2.0, f"took {seconds:.2f} s"


def test_bad_input_through_pretrain_entry_point(inputs):
    entry_point = REPO / "megatron" / "pretrain.py"
    assert entry_point.is_file(), f"{entry_point} (`python -m megatron.pretrain`, the entry point) is missing"
    argv = tiny_argv(inputs, hidden_size=100, num_attention_heads=3)
    result, seconds = run_timed([sys.executable, "-m", "megatron.pretrain", *argv])
    assert result.returncode == 2 and "--num-attention-heads 3" in result.stderr, result.stderr
    assert seconds < 2.0, f"took {seconds:.2f} s"


# ---------------------------------------------------------------- vocabulary


def test_check_vocab_size(inputs):
    cfg = load_config(tiny_argv(inputs))
    assert check_vocab_size(cfg, 1000) == 1024  # padded to a multiple of 128
    cfg.parallel.tensor_model_parallel_size = 2
    assert check_vocab_size(cfg, 1000) == 1024 and check_vocab_size(cfg, 1025) == 1280
    cfg.model.vocab_size = 49152
    assert check_vocab_size(cfg, 49152) == 49152
    with pytest.raises(ConfigError, match=r"49153 tokens.*--vocab-size 49152.*>= 49153"):
        check_vocab_size(cfg, 49153)
    # a vocabulary that tensor parallelism cannot split evenly is refused (before any process group)
    cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size = 49154, 4
    with pytest.raises(
        ConfigError, match=r"--vocab-size 49154 is not divisible by --tensor-model-parallel-size 4"
    ):
        check_vocab_size(cfg, 49152)
    cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size = None, 3
    assert check_vocab_size(cfg, 1000) == 1152  # padded to a multiple of 128 x 3


# ---------------------------------------------------------------- StarCoder run and presets


def test_starcoder_flag_list_parses_without_files(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "512")
    cfg = load_config(STARCODER_FLAGS, check_paths=False)
    assert_starcoder_run(cfg)


def test_starcoder_flag_list_parses_unchanged(tmp_path, monkeypatch, capsys):
    """The verbatim list with its placeholders made real files in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "512")
    Path("PATH").write_text("{}")
    Path("FILE").write_text("python: 1.0 0:1 corpus\n")
    cfg = parse_config(STARCODER_FLAGS)
    assert_starcoder_run(cfg)
    assert cfg.data.tokenizer_file == "PATH" and cfg.checkpoint.save == "DIR" and cfg.checkpoint.load == "DIR"
    assert cfg.data.train_weighted_split_paths_path == "FILE" and cfg.logging.wandb_entity_name == "NAME"
    notes = cfg.notes(device_type="cpu")
    assert any("--use-flash-attn" in note for note in notes) and any("--bf16" in note for note in notes)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "world size 1" in expect_exit(capsys, STARCODER_FLAGS)


def assert_starcoder_run(cfg: Config) -> None:
    m, p, o, t = cfg.model, cfg.parallel, cfg.optimizer, cfg.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.attention_head_type) == (
        40,
        6144,
        48,
        "multiquery",
    )
    assert (m.ffn_hidden_size, m.kv_channels, m.num_key_value_heads) == (24576, 128, 1)
    assert (m.seq_length, m.max_position_embeddings, m.init_method_std) == (8192, 8192, 0.01275)
    assert (m.attention_dropout, m.hidden_dropout, m.use_flash_attn) == (0.1, 0.1, True)
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (4, 4)
    assert p.sequence_parallel and p.use_distributed_optimizer and cfg.data_parallel_size == 32
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.precision) == (1, 512, 250000, "bf16")
    assert (o.lr, o.min_lr, o.lr_decay_iters, o.lr_decay_style, o.lr_warmup_iters) == (
        3e-4,
        3e-5,
        250000,
        "cosine",
        2000,
    )
    assert (o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (
        0.1,
        0.9,
        0.95,
        1e-8,
        1.0,
    )
    assert cfg.data.fim_rate == 0.5 and cfg.data.fim_spm_rate == 0.5 and t.seed == 1234
    assert (cfg.logging.log_interval, cfg.checkpoint.save_interval, t.eval_interval, t.eval_iters) == (
        10,
        2500,
        2500,
        2,
    )


def test_starcoderbase_15b_preset_is_the_spec_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "512")
    preset = load_config(["--config", "starcoderbase-15b"], check_paths=False)
    assert_starcoder_run(preset)
    flags = load_config(STARCODER_FLAGS, check_paths=False)
    expected = flags.to_dict()
    for section, name in [("data", "tokenizer_file"), ("checkpoint", "save"), ("checkpoint", "load")]:
        expected[section][name] = None
    for name in ("tensorboard_dir", "wandb_entity_name", "wandb_project_name", "metrics_jsonl"):
        expected["logging"][name] = None
    for name in ("train_weighted_split_paths_path", "valid_weighted_split_paths_path"):
        expected["data"][name] = None
    expected["model"]["vocab_size"] = 49152  # the preset states the StarCoder vocabulary explicitly
    assert preset.to_dict() == expected


PRESET_WORLD_SIZES = {"starcoderbase-15b": 512, "starcoderbase-1b": 8, "santacoder-1b": 8, "tiny-cpu": 1}


def test_preset_list_is_known():
    assert set(preset_names()) >= set(PRESET_WORLD_SIZES)


@pytest.mark.parametrize("name", sorted(PRESET_WORLD_SIZES))
def test_every_preset_loads_and_validates(inputs, monkeypatch, name):
    monkeypatch.setenv("WORLD_SIZE", str(PRESET_WORLD_SIZES[name]))
    path = REPO / "configs" / f"{name}.yaml"
    for spelling in (name, str(path)):
        cfg = load_config(
            ["--config", spelling, "--data-path", inputs["prefix"], "--tokenizer-file", inputs["tokenizer"]]
        )
        assert cfg.model.kv_channels * cfg.model.num_attention_heads == cfg.model.hidden_size
        assert cfg.model.attention_head_type == "multiquery" and cfg.data.fim_rate == 0.5


def test_preset_shapes():
    one_b = load_config(["--config", "starcoderbase-1b"], world_size=8, check_paths=False).model
    assert (one_b.num_layers, one_b.hidden_size, one_b.num_attention_heads, one_b.ffn_hidden_size) == (
        24,
        2048,
        16,
        8192,
    )
    assert (one_b.seq_length, one_b.init_method_std, one_b.vocab_size) == (8192, 0.02209, 49152)
    santa = load_config(["--config", "santacoder-1b"], world_size=8, check_paths=False)
    assert (santa.model.num_layers, santa.model.hidden_size, santa.model.seq_length) == (24, 2048, 2048)
    assert (
        santa.model.vocab_size == 49280
        and santa.model.vocab_size % santa.model.make_vocab_size_divisible_by == 0
    )
    tiny = load_config(["--config", "tiny-cpu"], world_size=1, check_paths=False)
    assert (
        tiny.training.precision == "fp32"
        and tiny.model.hidden_dropout == 0.0
        and tiny.model.num_key_value_heads == 1
    )

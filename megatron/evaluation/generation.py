"""Completions of evaluation problems through the KV-cache generator (`megatron.inference.generate`).

Rows (problem x sample) are sorted by prompt length and decoded `batch_size` at a time; batch b samples
with the seed `seed + b`, so a run is reproducible for the same problems, seed and batch size. A row ends
at end-of-document, at the first of its task's stop sequences (cut before it), or after
`max_new_tokens`. A prompt longer than the context minus `max_new_tokens` keeps its last tokens (an
infilling prompt: the end of its prefix and the start of its suffix) and is marked truncated.

Infilling prompts follow the FIM layouts training uses (megatron/data/fim.py): PSM
`<fim_prefix> prefix <fim_suffix> suffix <fim_middle>` and SPM `<fim_prefix> <fim_suffix> suffix
<fim_middle> prefix`; the model writes the middle after them.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.evaluation.tasks import Problem
from megatron.log import progress_bar

FIM_MODES = ("psm", "spm")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 1234
    batch_size: int = 8
    fim_mode: str = "psm"

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens}: must be >= 1"),
            (self.temperature >= 0, f"--temperature {self.temperature}: must be >= 0 (0 is greedy)"),
            (0 < self.top_p <= 1, f"--top-p {self.top_p}: must be in (0, 1]"),
            (self.num_samples >= 1, f"--n-samples {self.num_samples}: must be >= 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1"),
            (self.fim_mode in FIM_MODES, f"--fim-mode {self.fim_mode}: choose psm or spm"),
            (
                self.num_samples == 1 or self.temperature > 0,
                f"--n-samples {self.num_samples} with greedy decoding gives identical samples: "
                "set --temperature > 0 (e.g. 0.2 for pass@1, 0.8 for pass@100) or --n-samples 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _fim_ids(tokenizer, problem: Problem, budget: int, mode: str) -> tuple[list[int], bool]:
    from megatron.inference.generate import fim_layout

    prefix, suffix = tokenizer.encode(problem.prefix), tokenizer.encode(problem.suffix)
    room = budget - 3
    truncated = len(prefix) + len(suffix) > room
    if truncated:  # keep the text nearest the hole: the end of the prefix, the start of the suffix
        keep_suffix = min(len(suffix), max(room // 2, room - len(prefix)))
        keep_prefix = room - keep_suffix
        prefix, suffix = (prefix[-keep_prefix:] if keep_prefix > 0 else []), suffix[:keep_suffix]
    return fim_layout(tokenizer, prefix, suffix, mode), truncated


def prompt_ids(tokenizer, problem: Problem, budget: int, mode: str = "psm") -> tuple[list[int], bool]:
    """(the ids the model sees for `problem`, at most `budget` of them; whether they were truncated)."""
    if problem.infilling:
        return _fim_ids(tokenizer, problem, budget, mode)
    ids = tokenizer.encode(problem.prompt)
    return (ids[-budget:], True) if len(ids) > budget else (ids, False)


def _cut(text: str, stop) -> str:
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(found)] if found else text


def generate_completions(
    model, tokenizer, problems: list[Problem], settings: GenerationSettings, *, progress=None
) -> tuple[list[list[str]], list[bool]]:
    """(completions[problem][sample], truncated[problem]) for every problem."""
    from megatron.inference.generate import SamplingParams, generate_tokens

    settings.validate()
    context = int(model.config.max_position_embeddings or model.config.seq_length)
    budget = context - settings.max_new_tokens
    if budget < 4:
        raise ValueError(
            f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the model's "
            f"{context}-token context: use at most {context - 4}"
        )
    prompts = [prompt_ids(tokenizer, problem, budget, settings.fim_mode) for problem in problems]
    rows = [(p, s) for p in range(len(problems)) for s in range(settings.num_samples)]
    rows.sort(key=lambda row: (-len(prompts[row[0]][0]), row))
    completions = [[""] * settings.num_samples for _ in problems]
    with progress_bar(total=len(rows), desc="generating", unit="sample", enabled=progress) as bar:
        for batch_index, start in enumerate(range(0, len(rows), settings.batch_size)):
            batch = rows[start : start + settings.batch_size]
            stop = problems[batch[0][0]].stop
            sampling = SamplingParams(settings.temperature, 0, settings.top_p, settings.seed + batch_index)
            new_ids = generate_tokens(
                model,
                [prompts[p][0] for p, _ in batch],
                settings.max_new_tokens,
                sampling=sampling,
                stop_ids=(tokenizer.eod,),
                vocab_size=tokenizer.vocab_size,
                pad_id=tokenizer.eod,
                stop_strings=list(stop),
                tokenizer=tokenizer,
            )
            for (p, s), ids in zip(batch, new_ids):
                completions[p][s] = _cut(tokenizer.decode(ids), stop)
            bar.update(len(batch))
    return completions, [truncated for _, truncated in prompts]

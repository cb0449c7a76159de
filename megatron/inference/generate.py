"""Text generation: batched KV-cache decoding with greedy / temperature / top-k / top-p sampling.

- `generate_tokens(model, prompts, ...)`: the core. Prompts (lists of ids) are left-padded into one batch,
  prefilled in one forward and decoded one token per step through `GPTModel.forward` with a preallocated
  `KVCache` (multi-query caches its one K/V head), or with `use_cache=False` by re-running the
  whole sequence every step (the reference the cache is tested against). Positions of a left-padded row
  count its real tokens only (as `transformers`' generate does), so a padded prompt continues exactly
  as it would alone.
- `SamplingParams`: temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the
  `top_k` most likely tokens and the smallest set whose probability reaches `top_p`, drawn from a
  `torch.Generator` seeded by `seed` (the same seed gives the same text).
- Stops: a row ends at the tokenizer's end-of-document id or once its text contains one of `stop`
  strings (the text is cut before it), or after `max_new_tokens`.
- FIM: `fim_prompt_ids(tokenizer, prefix, suffix)` is `<fim_prefix>prefix<fim_suffix>suffix<fim_middle>`
  (the PSM order of training), and the model writes the middle.
- `generate_ids` / `generate` (one prompt, greedy) are kept for existing callers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


def _context_length(model: torch.nn.Module, max_context: int | None) -> int:
    if max_context is not None:
        return max_context
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError("pass max_context: the model has no config.max_position_embeddings")


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    vocab_size: int | None = None,
    stop_id: int | None = None,
    max_context: int | None = None,
) -> list[int]:
    """Greedy continuation of `prompt_ids`: up to `max_new_tokens` ids (stopping after `stop_id`), with the
    KV cache while the prompt and the new tokens fit the context.

    `vocab_size` restricts the argmax to real tokens (the padded rows of the output layer are never
    chosen); the model sees at most the last `max_context` tokens.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    context = _context_length(model, max_context)
    if len(prompt_ids) + max_new_tokens <= context and hasattr(model, "new_kv_cache"):
        stop_ids = () if stop_id is None else (stop_id,)
        return generate_tokens(
            model, [list(prompt_ids)], max_new_tokens, stop_ids=stop_ids, vocab_size=vocab_size
        )[0]
    # longer than the context: a sliding window over the last `context` tokens, the whole window re-run
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, t]
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        window = tokens[:, -context:]
        logits = model(window)  # [1, t, vocab]
        next_logits = logits[0, -1, :vocab_size] if vocab_size else logits[0, -1]
        next_id = int(next_logits.float().argmax())
        if stop_id is not None and next_id == stop_id:
            break
        new_ids.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    model.train(was_training)
    return new_ids


def generate(
    model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int, *, max_context: int | None = None
) -> str:
    """Greedy completion of `prompt` (the text generated after it), stopping at end-of-document."""
    new_ids = generate_ids(
        model,
        tokenizer.encode(prompt),
        max_new_tokens,
        vocab_size=tokenizer.vocab_size,
        stop_id=tokenizer.eod,
        max_context=max_context,
    )
    return tokenizer.decode(new_ids)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: `temperature` 0 = greedy (argmax); else sampled at that temperature
    from the `top_k` most likely tokens (0 = all) and the smallest set with probability >= `top_p`
    (1.0 = all), with a generator seeded by `seed` (None: a fresh random seed)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [b, V] with every token outside the top-k / nucleus (top-p) set to -inf. The most likely
    token is always kept."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # the first token has before = 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [b, V] (float) -> next ids int64 [b]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> (tokens [b, T], mask [b, T] True = real, positions [b, T]), left-padded to the longest;
    positions count real tokens from 0 (0 on padding)."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt was given)")
    length = max(len(prompt) for prompt in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    return tokens, mask, positions


class _StopStrings:
    """Finds the first of `stop` strings in each row's generated text (None: no stop strings)."""

    def __init__(self, tokenizer, stop) -> None:
        self.stop = [text for text in (stop or ()) if text]
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated ids")
        self.tokenizer = tokenizer

    def hit(self, ids: list[int]) -> bool:
        return bool(self.stop) and self.cut(self.tokenizer.decode(ids)) is not None

    def cut(self, text: str) -> int | None:
        """Index of the earliest stop string in `text`, None if none occurs."""
        found = [index for index in (text.find(stop) for stop in self.stop) if index >= 0]
        return min(found) if found else None


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingParams | None = None,
    stop_ids=(),
    vocab_size: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    stop_strings=None,
    tokenizer=None,
) -> list[list[int]]:
    """New ids for each prompt (a batch, left-padded): up to `max_new_tokens`, without the stop id that
    ended a row (`stop_ids`, e.g. the end-of-document id). `vocab_size` restricts choices to real tokens
    (the output layer's padding rows are never chosen). With `stop_strings` (and the `tokenizer` to decode)
    a row also ends once its text contains one; the ids are kept up to that token (`generate_text` cuts
    the text). Prompt + new tokens must fit max_position_embeddings."""
    sampling = sampling or SamplingParams()
    sampling.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    stops = _StopStrings(tokenizer, stop_strings)
    tokens, mask, positions = left_pad(prompts, pad_id)
    b, prompt_length = tokens.shape
    total = prompt_length + max_new_tokens
    context = _context_length(model, None)
    if total > context:
        raise ValueError(
            f"the longest prompt ({prompt_length} tokens) + max_new_tokens={max_new_tokens} = {total} "
            f"exceeds max_position_embeddings={context}"
        )
    device = next(model.parameters()).device
    generator = None
    if not sampling.greedy:
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        step = _cached_steps if use_cache else _uncached_steps
        out = torch.empty(b, max_new_tokens, dtype=torch.long)
        num_steps = _decode(
            step(model, tokens.to(device), mask.to(device), positions.to(device), total),
            out,
            sampling,
            generator,
            vocab_size,
            set(stop_ids),
            stops,
        )
    finally:
        model.train(was_training)
    return [_trim(row[:num_steps], set(stop_ids), stops) for row in out.tolist()]


def _decode(steps, out, sampling, generator, vocab_size, stop_ids, stops) -> int:
    """Drive the step generator: choose each row's next id, feed it back, stop when every row ended.
    Returns the number of steps taken."""
    b, max_new_tokens = out.shape
    finished = torch.zeros(b, dtype=torch.bool)
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long)
    logits = next(steps)  # [b, V] at the last prompt position
    for index in range(max_new_tokens):
        chosen = sample_next(
            logits[:, :vocab_size].float() if vocab_size else logits.float(), sampling, generator
        )
        out[:, index] = chosen.cpu()
        if len(stop_tensor):
            finished |= torch.isin(out[:, index], stop_tensor)
        if stops.stop:
            for row in range(b):
                if not finished[row] and stops.hit(out[row, : index + 1].tolist()):
                    finished[row] = True
        if index + 1 == max_new_tokens or bool(finished.all()):
            steps.close()
            return index + 1
        logits = steps.send(chosen)
    return max_new_tokens


def _trim(ids: list[int], stop_ids: set[int], stops: _StopStrings) -> list[int]:
    """A row's ids up to (without) its first stop id, and up to the token that completed a stop string."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:index]
            break
    if stops.stop:
        for end in range(1, len(ids) + 1):
            if stops.hit(ids[:end]):
                return ids[:end]
    return ids


def _cached_steps(model, tokens, mask, positions, total):
    """Prefill the prompts into a KV cache, then one position per step: yields logits [b, V], receives
    the chosen ids [b]."""
    b = tokens.shape[0]
    cache = model.new_kv_cache(b, total)
    padded = not bool(mask.all())
    cache.mark_padding(mask)
    logits = model(tokens, position_ids=positions, kv_cache=cache, last_only=True)
    next_position = positions[:, -1:] + 1  # [b, 1]
    while True:
        chosen = yield logits[:, -1]
        step_positions = next_position if padded else None
        logits = model(chosen.view(b, 1), position_ids=step_positions, kv_cache=cache)
        next_position += 1


def _uncached_steps(model, tokens, mask, positions, total):
    """The reference: re-run the whole (left-padded) sequence every step with a causal + padding mask."""
    b = tokens.shape[0]
    while True:
        s = tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)
        own = torch.eye(s, dtype=torch.bool, device=tokens.device)
        attention_mask = (causal | (~mask[:, None, :] & ~own)).unsqueeze(1)  # [b, 1, s, s], True = masked
        logits = model(tokens, position_ids=positions, attention_mask=attention_mask)
        chosen = yield logits[:, -1]
        tokens = torch.cat([tokens, chosen.view(b, 1)], dim=1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)


def fim_layout(tokenizer, prefix_ids: list[int], suffix_ids: list[int], mode: str = "psm") -> list[int]:
    """A FIM prompt from token ids in the order training lays samples out: PSM
    `<fim_prefix>prefix<fim_suffix>suffix<fim_middle>`, SPM `<fim_prefix><fim_suffix>suffix<fim_middle>prefix`;
    the model writes the middle next."""
    fim_prefix, fim_suffix, fim_middle = _fim_tokens(tokenizer)
    if mode == "spm":
        return [fim_prefix, fim_suffix, *suffix_ids, fim_middle, *prefix_ids]
    return [fim_prefix, *prefix_ids, fim_suffix, *suffix_ids, fim_middle]


def _fim_tokens(tokenizer) -> tuple[int, int, int]:
    """The tokenizer's <fim_prefix>, <fim_suffix> and <fim_middle> ids; ValueError naming any it lacks."""
    special = {
        "<fim_prefix>": tokenizer.fim_prefix,
        "<fim_suffix>": tokenizer.fim_suffix,
        "<fim_middle>": tokenizer.fim_middle,
    }
    missing = [name for name, token_id in special.items() if token_id is None]
    if missing:
        raise ValueError(f"FIM needs the tokenizer's {', '.join(missing)} token(s); {tokenizer!r} has none")
    return tuple(special.values())


def fim_prompt_ids(tokenizer, prefix: str, suffix: str) -> list[int]:
    """`<fim_prefix>prefix<fim_suffix>suffix<fim_middle>` as ids (PSM, the order of FIM training)."""
    _fim_tokens(tokenizer)  # before encoding anything
    return fim_layout(tokenizer, tokenizer.encode(prefix), tokenizer.encode(suffix))


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | None,
    max_new_tokens: int,
    *,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
    fim: list[tuple[str, str]] | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Completions (the text after each prompt) of a batch of `prompts`, or with `fim` the middles for
    (prefix, suffix) pairs. Rows end at end-of-document, at the first `stop` string (cut before it) or
    after `max_new_tokens`."""
    if (prompts is None) == (fim is None):
        raise ValueError("give either prompts or fim (prefix, suffix) pairs")
    if fim is not None:
        ids = [fim_prompt_ids(tokenizer, prefix, suffix) for prefix, suffix in fim]
    else:
        ids = [tokenizer.encode(prompt) for prompt in prompts]
    stops = _StopStrings(tokenizer, stop)
    new_ids = generate_tokens(
        model,
        ids,
        max_new_tokens,
        sampling=sampling,
        stop_ids=(tokenizer.eod,),
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.eod,
        use_cache=use_cache,
        stop_strings=stop,
        tokenizer=tokenizer,
    )
    texts = [tokenizer.decode(row) for row in new_ids]
    return [text if stops.cut(text) is None else text[: stops.cut(text)] for text in texts]


def _sharded_directory(load_dir) -> Path | None:
    """The checkpoint directory when `load_dir` names a sharded (DCP) checkpoint: an iteration directory
    itself or a --save directory whose tracked iteration is one; None for a basic checkpoint."""
    from megatron.checkpoint.directory import checkpoint_dir, read_tracker

    root = Path(load_dir)
    if (root / "common.json").is_file() or (root / ".metadata").is_file():
        return root
    iteration = read_tracker(root)
    if iteration is None:
        raise ValueError(f"--load {load_dir}: no checkpoint there (no latest_checkpointed_iteration.txt)")
    directory = checkpoint_dir(root, iteration)
    if (directory / "common.json").is_file() or (directory / ".metadata").is_file():
        return directory
    return None


def read_checkpoint_config(load_dir) -> dict:
    """The run's config (`Config.to_dict()`: {"model": {...}, "data": {...}, ...}) stored with the latest
    checkpoint under `load_dir`, sharded or basic, without reading the weights into memory."""
    directory = _sharded_directory(load_dir)
    if directory is not None:
        from megatron.checkpoint.verify import read_common

        return read_common(directory)["config"]
    return _read_basic(load_dir, mmap=True)["args"]


def _read_basic(load_dir, *, mmap: bool = False, verify: bool = False) -> dict:
    from megatron.checkpoint.directory import checkpoint_dir, read_tracker
    from megatron.checkpoint.files import verify_torch_file
    from megatron.checkpoint.single_file import MODEL_FILENAME

    iteration = read_tracker(load_dir)
    file = checkpoint_dir(load_dir, iteration) / MODEL_FILENAME
    if not file.is_file():
        raise ValueError(
            f"--load {load_dir}: iteration {iteration} has neither a sharded checkpoint (common.json) nor {file}"
        )
    if verify:  # the CRC32 of every record of the file (what a single file carries)
        verify_torch_file(file)
    return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def _check_file_sizes(directory: Path) -> None:
    """Every file the manifest lists exists with its recorded size (a truncated or half-copied
    checkpoint fails here, naming the file). Hashes are not checked: that reads the whole checkpoint,
    optimizer state included (`tools/checkpoint_util.py verify` does it)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"{manifest}: missing (an incomplete checkpoint)")
    for relative, entry in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
        path = directory / relative
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ValueError(f"{path}: {found}, manifest.json records {entry['bytes']} bytes")


def _model_weights(load_dir, verify: bool = True) -> tuple[dict, dict]:
    """(config dict, {parameter name: full tensor}) of the latest checkpoint under `load_dir`, verified
    first as training verifies it (every file's size and checksum against the manifest; a basic
    checkpoint's record CRCs) unless `verify` is False (then sizes only).

    Sharded checkpoints saved at any TP x PP x DP layout read back as full logical tensors in one
    process (`load_full_state`); basic ones are one file."""
    directory = _sharded_directory(load_dir)
    if directory is None:
        state = _read_basic(load_dir, verify=verify)
        return state["args"], state["model"]
    from megatron.checkpoint.readers import load_full_state
    from megatron.checkpoint.verify import read_common

    if not verify:
        _check_file_sizes(directory)
    config = read_common(directory)["config"]
    prefix = "model/"
    weights = {
        (name[len(prefix) :] if name.startswith(prefix) else name): tensor
        for name, tensor in load_full_state(directory, prefix, verify=verify).items()
    }
    return config, weights


def load_model_from_checkpoint(
    load_dir, device: torch.device | str = "cpu", *, verify: bool = True
) -> torch.nn.Module:
    """Rebuild the GPTModel saved under `load_dir` from its stored config, in fp32 and eval mode. The
    checkpoint is verified first (ValueError naming a damaged file) unless `verify` is False.

    `load_dir` is a --save directory (its tracked iteration) or a sharded checkpoint's iteration
    directory; sharded checkpoints of any saving layout and basic single-file ones both load. The model
    is built without initialising weights (meta device) and takes the loaded tensors as they are, so the
    weights are in memory once."""
    from megatron.checkpoint.mismatch import check_fits
    from megatron.config import ModelConfig
    from megatron.model import GPTModel

    config, weights = _model_weights(load_dir, verify)
    model_config = ModelConfig(**config["model"])
    vocab_name = next((name for name in weights if name.endswith("word_embeddings.weight")), None)
    if vocab_name is None:
        raise ValueError(
            f"--load {load_dir}: the checkpoint holds no word embedding (model/...word_embeddings)"
        )
    model = GPTModel(model_config, weights[vocab_name].shape[0], device="meta")
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    check_fits(f"--load {load_dir} (its stored config)", expected, found)
    model.load_state_dict(weights, assign=True)
    return model.float().to(device).eval()

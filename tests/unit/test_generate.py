"""KV-cache generation: cache vs no cache, parity with transformers' generate, sampling, FIM, stops, CLI."""

from __future__ import annotations

import pytest
import torch

from megatron.checkpoint.gpt_bigcode import gpt_bigcode_config_kwargs, to_gpt_bigcode_state_dict
from megatron.inference.generate import (
    SamplingParams,
    filter_logits,
    fim_prompt_ids,
    generate_ids,
    generate_text,
    generate_tokens,
)
from megatron.model import GPTModel
from tests.helpers import load_tool, tiny_model_config

VOCAB = 128
NEW_TOKENS = 32
# different lengths: the batch is left-padded
PROMPTS = [[5, 17, 42, 7, 99, 3, 11], [8, 1], [60, 61, 62, 63, 64]]


def tiny_model(head_type: str = "multiquery", vocab: int = VOCAB, seed: int = 3) -> GPTModel:
    config = tiny_model_config(attention_head_type=head_type, seq_length=64)
    model = GPTModel(config, vocab)
    model.init_weights(seed)
    with torch.no_grad():  # larger output weights: a peaked next-token distribution, no near-ties
        model.embedding.word_embeddings.weight.mul_(8.0)
    return model.eval()


# ---------------------------------------------------------------- the cache


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_cache_holds_one_kv_head_for_multi_query(head_type):
    model = tiny_model(head_type)
    cache = model.new_kv_cache(3, 40)
    heads = 1 if head_type == "multiquery" else 4
    assert len(cache.keys) == 2 and cache.keys[0].shape == (3, 40, heads, 16)


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_incremental_logits_equal_full_forward(head_type):
    model = tiny_model(head_type)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        steps = [model(tokens[:, :12], kv_cache=cache)]
        steps += [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(12, 20)]
    # same math, different GEMM shapes (summation order): fp32 rounding only
    torch.testing.assert_close(torch.cat(steps, 1), model(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_kv_cache_and_no_cache_give_identical_ids(head_type):
    model = tiny_model(head_type)
    cached = generate_tokens(model, PROMPTS, NEW_TOKENS, vocab_size=VOCAB)
    uncached = generate_tokens(model, PROMPTS, NEW_TOKENS, vocab_size=VOCAB, use_cache=False)
    assert cached == uncached and all(len(row) == NEW_TOKENS for row in cached)


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_left_padded_rows_continue_as_if_alone(head_type):
    model = tiny_model(head_type)
    batched = generate_tokens(model, PROMPTS, NEW_TOKENS)
    alone = [generate_tokens(model, [prompt], NEW_TOKENS)[0] for prompt in PROMPTS]
    assert batched == alone


def test_generate_ids_keeps_its_contract():
    model = tiny_model()
    ids = generate_ids(model, PROMPTS[0], 6, vocab_size=100)
    with torch.no_grad():
        assert ids[0] == model(torch.tensor([PROMPTS[0]]))[0, -1, :100].argmax().item()
    assert generate_ids(model, PROMPTS[0], 6, vocab_size=100, stop_id=ids[3]) == ids[: ids.index(ids[3])]


# ---------------------------------------------------------------- parity with transformers


def _to_hf(model: GPTModel):
    transformers = pytest.importorskip("transformers")
    config = model.config
    kwargs = gpt_bigcode_config_kwargs(config, VOCAB, attn_implementation="eager")
    hf = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**kwargs)).eval()
    missing, unexpected = hf.load_state_dict(
        to_gpt_bigcode_state_dict(model.state_dict(), config), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return transformers, hf


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_greedy_ids_equal_transformers_generate(head_type):
    model = tiny_model(head_type)
    transformers, hf = _to_hf(model)
    ours = generate_tokens(model, PROMPTS, NEW_TOKENS)
    length = max(len(prompt) for prompt in PROMPTS)
    input_ids = torch.zeros(len(PROMPTS), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(PROMPTS):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    generation = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        theirs = hf.generate(input_ids, attention_mask=attention_mask, generation_config=generation)
    assert theirs[:, length:].tolist() == ours


# ---------------------------------------------------------------- sampling


def test_top_k_one_is_greedy():
    model = tiny_model()
    greedy = generate_tokens(model, PROMPTS, 16)
    assert (
        generate_tokens(model, PROMPTS, 16, sampling=SamplingParams(temperature=1.5, top_k=1, seed=1))
        == greedy
    )


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    draw = lambda seed: generate_tokens(  # noqa: E731
        model, PROMPTS, 16, sampling=SamplingParams(temperature=50.0, seed=seed)
    )
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    # a hot temperature samples far from the greedy path
    assert draw(7) != generate_tokens(model, PROMPTS, 16)


def test_top_p_restricts_to_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [True, True, False, False]
    # sampled: only the nucleus ever comes out
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.6)
    from megatron.inference.generate import sample_next

    draws = {sample_next(logits.expand(500, 4), params, generator)[i].item() for i in range(500)}
    assert draws == {0, 1}


def test_bad_sampling_values_are_rejected():
    model = tiny_model()
    for params, word in [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(temperature=1.0, top_p=0.0), "top_p"),
        (SamplingParams(temperature=1.0, top_k=-2), "top_k"),
    ]:
        with pytest.raises(ValueError, match=word):
            generate_tokens(model, PROMPTS, 4, sampling=params)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        generate_tokens(model, PROMPTS, 60)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_tokens(model, [[1], []], 4)


# ---------------------------------------------------------------- FIM and stops (the real tokenizer)


def test_fim_prompt_is_prefix_suffix_middle(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = fim_prompt_ids(tok, "def add(a, b):\n    ", "\n    return c\n")
    prefix, suffix = tok.encode("def add(a, b):\n    "), tok.encode("\n    return c\n")
    assert ids == [tok.fim_prefix, *prefix, tok.fim_suffix, *suffix, tok.fim_middle]
    model = tiny_model(vocab=tok.padded_vocab_size)
    texts = generate_text(model, tok, None, 8, fim=[("def add(a, b):\n    ", "\n    return c\n")])
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_fim_needs_the_tokens():
    class Plain:
        fim_prefix = fim_suffix = fim_middle = None

    with pytest.raises(ValueError, match="<fim_prefix>"):
        fim_prompt_ids(Plain(), "a", "b")


def test_stop_strings_and_end_of_document(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_model(vocab=tok.padded_vocab_size, seed=11)
    prompts = ["def f(x):", "import os"]
    ids = generate_tokens(model, [tok.encode(p) for p in prompts], 20, vocab_size=tok.vocab_size)
    texts = [tok.decode(row) for row in ids]
    assert generate_text(model, tok, prompts, 20) == texts or any(tok.eod in row for row in ids)
    # a stop string taken from the first completion: that row is cut right before it
    stop = texts[0][len(texts[0]) // 2 :][:3] or texts[0]
    stopped = generate_text(model, tok, prompts, 20, stop=[stop])
    assert stop not in stopped[0] and texts[0].startswith(stopped[0])
    assert stopped[0] == texts[0][: texts[0].find(stop)]
    # end-of-document: with the first completion's third id as the stop id, it ends before it
    stop_id = ids[0][2]
    assert (
        generate_tokens(model, [tok.encode(prompts[0])], 20, stop_ids=(stop_id,))[0]
        == ids[0][: ids[0].index(stop_id)]
    )


# ---------------------------------------------------------------- tools/generate.py


def _saved_checkpoint(tmp_path, tokenizer):
    from megatron.checkpoint.single_file import save_checkpoint
    from megatron.config import Config

    model = tiny_model(vocab=tokenizer.padded_vocab_size)
    save_checkpoint(tmp_path, 1, model, None, None, None, 0, Config(model=model.config).to_dict())
    return model


def test_cli_flags(tmp_path, tiny_tokenizer, tiny_tokenizer_path, capsys):
    _saved_checkpoint(tmp_path, tiny_tokenizer)
    tool = load_tool("generate")
    base = ["--load", str(tmp_path), "--tokenizer-file", str(tiny_tokenizer_path), "--max-new-tokens", "8"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nclass A:\n", encoding="utf-8")
    assert tool.main(base + ["--prompt", "import os", "--prompt-file", str(prompts)]) == 0
    cached = capsys.readouterr().out
    assert cached.count("--- prompt ---") == 3
    assert tool.main(base + ["--prompt", "import os", "--prompt-file", str(prompts), "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached
    sampled = base + [
        "--prompt",
        "x",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    assert tool.main(sampled) == 0
    first = capsys.readouterr().out
    assert tool.main(sampled) == 0 and capsys.readouterr().out == first
    assert tool.main(base + ["--prefix", "def f(", "--suffix", "\\n    return 1", "--stop", "\\n\\n"]) == 0
    assert "middle" in capsys.readouterr().out
    for bad, word in [
        (["--prefix", "a"], "--suffix"),
        (["--prompt", "a", "--top-p", "0"], "--top-p"),
        (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--prompt", "a", "--max-new-tokens", "500"], "max_position_embeddings"),
    ]:
        assert tool.main(base + bad) == 2
        assert word in capsys.readouterr().err

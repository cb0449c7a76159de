"""Conversion to and from Hugging Face GPTBigCode and from legacy Megatron checkpoints, checked against
`transformers` itself (offline: every HF model is built from a local config).

Tolerances: logits of the same fp32 weights through two implementations differ only by summation
order, so 1e-5 max abs (the issue's bar); weights that only move between files compare exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.checkpoint import Checkpointer, load_full_state
from megatron.config import Config, ModelConfig
from megatron.model import GPTModel, build_model
from megatron.parallel.state import ParallelState
from tests.conftest import TINY_VOCAB_SIZE
from tests.helpers import load_tool, tiny_model_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ = 32
LOGITS_ATOL = 1e-5  # fp32, two implementations: summation order only
CPU = ParallelState.single("cpu")


@pytest.fixture(scope="module")
def to_hf():
    return load_tool("convert_to_hf")


@pytest.fixture(scope="module")
def from_hf():
    return load_tool("convert_from_hf")


@pytest.fixture(scope="module")
def from_legacy():
    return load_tool("convert_legacy")


def tiny_config(head_type: str = "multiquery", **overrides) -> ModelConfig:
    return tiny_model_config(**{"attention_head_type": head_type, "seq_length": SEQ, **overrides})


def run_config(config: ModelConfig, tokenizer_path, **parallel) -> dict:
    sections = {
        "model": dataclasses.asdict(config),
        "data": {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": str(tokenizer_path)},
        "parallel": parallel,
    }
    return Config.from_dict(sections).to_dict()


def save_ours(root: Path, model: GPTModel, config_dict: dict, iteration: int = 3) -> Path:
    Checkpointer(CPU).save(root, iteration, model, None, None, None, consumed_samples=0, config=config_dict)
    return root


def random_tokens(
    batch: int = 2, seq: int = SEQ, vocab: int = TINY_VOCAB_SIZE, seed: int = 0
) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def briefly_train(model: GPTModel, vocab: int, steps: int = 3) -> None:
    """A few Adam steps, so the weights are no longer at their init statistics."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        tokens = random_tokens(vocab=vocab, seed=100 + step)
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def hf_loss(hf_model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of HF's logits against our (already shifted) labels."""
    with torch.no_grad():
        logits = hf_model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for file in files:
        out.update(safetensors_torch.load_file(str(file)))
    return out


def assert_nothing_written(path: Path) -> None:
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], "temporary left"


# --------------------------------------------------------------------------- ours -> HF


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_to_hf_logits_match_transformers(
    tmp_path, to_hf, tiny_tokenizer_path, tiny_tokenizer, head_type, trained
):
    config = tiny_config(head_type)
    padded_vocab = TINY_VOCAB_SIZE + 128  # padding rows the converter must cut
    model = GPTModel(config, padded_vocab)
    model.init_weights(11)
    if trained:
        briefly_train(model, TINY_VOCAB_SIZE)
    save_ours(tmp_path / "ckpt", model, run_config(config, tiny_tokenizer_path))
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPTBigCodeForCausalLM"
    tokens = random_tokens(seed=1)
    with torch.no_grad():
        ours = model.eval()(tokens)[..., :TINY_VOCAB_SIZE]
        theirs = hf(input_ids=tokens).logits
    assert theirs.shape == (2, SEQ, TINY_VOCAB_SIZE)
    assert (ours - theirs).abs().max().item() <= LOGITS_ATOL

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == TINY_VOCAB_SIZE
    assert hf_config["bos_token_id"] == hf_config["eos_token_id"] == tiny_tokenizer.eod
    assert hf_config["activation_function"] == "gelu_pytorch_tanh"
    assert hf_config["multi_query"] == (head_type == "multiquery")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.eod


def test_to_hf_streams_tensors_one_at_a_time(tmp_path, to_hf, tiny_tokenizer_path, monkeypatch):
    """The converter never materialises the whole checkpoint (load_full_state) but streams it."""
    import megatron.checkpoint as sharded

    config = tiny_config()
    model = GPTModel(config, TINY_VOCAB_SIZE)
    model.init_weights(1)
    save_ours(tmp_path / "ckpt", model, run_config(config, tiny_tokenizer_path))
    streamed = []
    original = sharded.iter_tensors

    def recording(*args, **kwargs):
        for name, tensor in original(*args, **kwargs):
            streamed.append(name)
            yield name, tensor

    def forbidden(*args, **kwargs):
        raise AssertionError("load_full_state reads every tensor at once")

    monkeypatch.setattr(sharded, "iter_tensors", recording)
    monkeypatch.setattr(sharded, "load_full_state", forbidden)
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0
    assert sorted(streamed) == sorted(name for name, _ in model.named_parameters())


def test_to_hf_tokenizer_loads_and_matches_ours(tmp_path, to_hf, tiny_tokenizer_path, tiny_tokenizer):
    config = tiny_config()
    model = GPTModel(config, TINY_VOCAB_SIZE)
    model.init_weights(1)
    save_ours(tmp_path / "ckpt", model, run_config(config, tiny_tokenizer_path))
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer(text).input_ids == tiny_tokenizer.encode(text)
    assert tokenizer.decode(tiny_tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == tiny_tokenizer.eod
    assert tokenizer.bos_token_id == tiny_tokenizer.eod
    assert tokenizer.convert_tokens_to_ids("<fim_prefix>") == tiny_tokenizer.fim_prefix


def test_to_hf_exact_gelu_sharded_and_bf16(tmp_path, to_hf, tiny_tokenizer_path):
    """The erf GELU is written as "gelu"; a small --max-shard-size gives shards and an index that
    from_pretrained follows; --dtype bf16 writes bf16 tensors equal to ours rounded."""
    config = tiny_config("multihead", activation="gelu", untie_embeddings_and_output_weights=True)
    model = GPTModel(config, TINY_VOCAB_SIZE)
    model.init_weights(2)
    save_ours(tmp_path / "ckpt", model, run_config(config, tiny_tokenizer_path))
    out = tmp_path / "hf"
    assert (
        to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(out), "--max-shard-size", "100KB"]) == 0
    )
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["activation_function"] == "gelu" and hf_config["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert set(index["weight_map"]) == set(read_weights(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(seed=2)
    with torch.no_grad():
        assert (model.eval()(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= LOGITS_ATOL

    bf16 = tmp_path / "hf_bf16"
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(bf16), "--dtype", "bf16"]) == 0
    weights = read_weights(bf16)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    expected = model.state_dict()["layers.1.mlp.dense_4h_to_h.weight"].to(torch.bfloat16)
    assert torch.equal(weights["transformer.h.1.mlp.c_proj.weight"], expected)


# --------------------------------------------------------------------------- HF -> ours -> HF


def make_hf_dir(
    path: Path, tokenizer_path, head_type: str = "multiquery", seed: int = 0, **config_overrides
) -> Path:
    """A GPTBigCode directory written by transformers itself (random init, our tiny tokenizer)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        n_positions=SEQ,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=256,
        multi_query=head_type == "multiquery",
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf_config = transformers.GPTBigCodeConfig(**{**fields, **config_overrides})
    model = transformers.GPTBigCodeForCausalLM(hf_config)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a swapped tensor cannot hide
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(Path(tokenizer_path).read_text())
    return path


HEAD_TYPES = ("multiquery", "multihead")


def _load_at_tp2_pp2(checkpoints: list[str], batch: dict) -> list[dict]:
    """Rank body: load each converted checkpoint at TP 2 x PP 2, compute the loss of `batch`, gather."""
    from megatron.config import ParallelConfig
    from megatron.parallel.layers import full_state_dict
    from megatron.training.step import forward_backward

    state = ParallelState.initialize(2, 2, backend="gloo")
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    results = []
    for ckpt in checkpoints:
        stored = json.loads(next(Path(ckpt).glob("iter_*/common.json")).read_text())["config"]
        config = ModelConfig(**stored["model"])
        model = build_model(config, config.vocab_size, state, parallel)
        Checkpointer(state).load(ckpt, model, None, None, None, finetune=True)
        model.eval()
        loss_sum, tokens = forward_backward(model, None, [batch], state, forward_only=True)
        results.append({"loss": (loss_sum / tokens).item(), "state": full_state_dict(model, state)})
        # saved again from TP 2 x PP 2 ranks: DTensor shards that convert_to_hf must stream back
        Checkpointer(state).save(
            ckpt + "_tp2pp2", 1, model, None, None, None, consumed_samples=0, config=stored
        )
    return results


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, tiny_tokenizer_path):
    """Both head types converted HF -> ours (recorded for TP 2 x PP 2) and loaded at TP 2 x PP 2 by 4
    gloo ranks in one spawn (spawning is most of the cost)."""
    from megatron.parallel.testing import run_distributed

    root = tmp_path_factory.mktemp("round_trip")
    from_hf = load_tool("convert_from_hf")
    cases = {}
    for head_type in HEAD_TYPES:
        hf_dir = make_hf_dir(root / f"hf_{head_type}", tiny_tokenizer_path, head_type)
        ckpt = root / f"ours_{head_type}"
        argv = ["--load", str(hf_dir), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]
        assert from_hf.main(argv + ["--pipeline-model-parallel-size", "2"]) == 0
        cases[head_type] = (hf_dir, ckpt)
    tokens = random_tokens(seed=3)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ - 1)}
    per_rank = run_distributed(_load_at_tp2_pp2, 4, [str(c) for _, c in cases.values()], batch, timeout=300)
    return root, cases, batch, per_rank


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_round_trip_hf_ours_tp2_pp2_hf_is_exact(round_trip, to_hf, head_type):
    from megatron.checkpoint.legacy import save_converted_checkpoint

    root, cases, batch, per_rank = round_trip
    hf_dir, ckpt = cases[head_type]
    index = HEAD_TYPES.index(head_type)
    common = json.loads(next(ckpt.glob("iter_*/common.json")).read_text())
    assert common["config"]["parallel"]["tensor_model_parallel_size"] == 2
    assert common["config"]["data"]["tokenizer_file"] == str((ckpt / "tokenizer.json").resolve())
    gathered = per_rank[0][index]["state"]
    for rank_results in per_rank[1:]:
        assert all(torch.equal(gathered[k], rank_results[index]["state"][k]) for k in gathered)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected_loss = hf_loss(hf, batch["tokens"], batch["labels"]).item()
    assert per_rank[0][index]["loss"] == pytest.approx(expected_loss, abs=1e-5)

    config = ModelConfig(**common["config"]["model"])
    gathered_ckpt, back = root / f"gathered_{head_type}", root / f"back_{head_type}"
    save_converted_checkpoint(gathered, config, gathered_ckpt, run_config=common["config"])
    assert to_hf.main(["--load", str(gathered_ckpt), "--save", str(back)]) == 0
    from_ranks = root / f"back_from_ranks_{head_type}"
    assert to_hf.main(["--load", f"{ckpt}_tp2pp2", "--save", str(from_ranks)]) == 0
    original = read_weights(hf_dir)
    original.pop("lm_head.weight", None)  # tied: transformers may or may not write the copy
    for converted in (read_weights(back), read_weights(from_ranks)):
        assert original.keys() == converted.keys()
        for name in original:
            assert torch.equal(original[name], converted[name]), name


def our_model_from(ckpt: Path) -> GPTModel:
    common = json.loads(next(ckpt.glob("iter_*/common.json")).read_text())
    weights = load_full_state(next(ckpt.glob("iter_*")))
    model = GPTModel(
        ModelConfig(**common["config"]["model"]), weights["embedding.word_embeddings.weight"].shape[0]
    )
    model.load_state_dict(weights)
    return model.eval()


def test_from_hf_untied_erf_gelu_from_pytorch_bin(tmp_path, from_hf, tiny_tokenizer_path):
    """An untied, erf-GELU model whose weights are a pytorch_model.bin (read with weights_only)."""
    hf_dir = make_hf_dir(
        tmp_path / "hf",
        tiny_tokenizer_path,
        "multihead",
        tie_word_embeddings=False,
        activation_function="gelu",
    )
    weights = safetensors_torch.load_file(str(hf_dir / "model.safetensors"))
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    (hf_dir / "model.safetensors").unlink()
    torch.save(weights, hf_dir / "pytorch_model.bin")
    ckpt = tmp_path / "ours"
    argv = ["--load", str(hf_dir), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]
    argv += ["--make-vocab-size-divisible-by", "384"]  # 1024 rows -> padded to 1536 (768 x 2)
    assert from_hf.main(argv) == 0
    ours = our_model_from(ckpt)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        padded = ours.state_dict()[name]
        assert padded.shape[0] == 1536 and not padded[TINY_VOCAB_SIZE:].any()
    assert ours.config.activation == "gelu" and ours.config.untie_embeddings_and_output_weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = random_tokens(seed=6)
    with torch.no_grad():
        difference = ours(tokens)[..., :TINY_VOCAB_SIZE] - hf(input_ids=tokens).logits
    assert difference.abs().max().item() <= LOGITS_ATOL


def test_from_hf_refuses_a_pickled_bin_with_code(tmp_path, from_hf, tiny_tokenizer_path, capsys):
    hf_dir = make_hf_dir(tmp_path / "hf", tiny_tokenizer_path)
    (hf_dir / "model.safetensors").unlink()

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"transformer.wte.weight": Exploit()}, hf_dir / "pytorch_model.bin")
    out = tmp_path / "ours"
    assert from_hf.main(["--load", str(hf_dir), "--save", str(out)]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out and "pytorch_model.bin: cannot read weights" in captured.err
    assert_nothing_written(out)


def test_finetune_first_loss_equals_hf_loss(
    tmp_path, from_hf, tiny_tokenizer_path, tiny_dataset_prefix, monkeypatch
):
    """A converted model continues training with --finetune; its first loss is HF's on the same batch."""
    from megatron.config import load_config
    from megatron.training import step
    from megatron.training.train import build_run, train

    hf_dir = make_hf_dir(tmp_path / "hf", tiny_tokenizer_path, seed=5)
    ckpt = tmp_path / "ours"
    assert from_hf.main(["--load", str(hf_dir), "--save", str(ckpt)]) == 0
    argv = (
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
        f"--seq-length {SEQ} --max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size 4 "
        "--train-iters 1 --lr 1e-3 --eval-iters 0 --eval-interval 100 --log-interval 1 --seed 7 "
        "--split 100,0,0 --num-workers 0 --fp32 --attention-dropout 0 --hidden-dropout 0 --finetune "
        "--tokenizer-type TokenizerFromFile"
    ).split()
    argv += ["--data-path", tiny_dataset_prefix, "--tokenizer-file", str(tiny_tokenizer_path)]
    argv += ["--load", str(ckpt), "--data-cache-path", str(tmp_path / "cache")]
    seen = []
    original = step.micro_batch_loss_sum

    def recording(model, batch):
        seen.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return original(model, batch)

    monkeypatch.setattr(step, "micro_batch_loss_sum", recording)
    run = build_run(load_config(argv), CPU)
    try:
        train(run)
    finally:
        run.metrics.close()
    assert len(seen) == 2 and len(run.losses) == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.cat([b["tokens"] for b in seen])
    labels = torch.cat([b["labels"] for b in seen])
    mask = torch.cat([b["loss_mask"] for b in seen]).flatten()
    with torch.no_grad():
        logits = hf(input_ids=tokens).logits.flatten(0, 1)
    token_losses = torch.nn.functional.cross_entropy(logits, labels.flatten(), reduction="none")
    expected = (token_losses * mask).sum() / mask.sum()
    assert run.losses[0] == pytest.approx(expected.item(), abs=1e-5)


# --------------------------------------------------------------------------- legacy


def _legacy_args(config: ModelConfig, vocab: int, tp: int, pp: int) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        kv_channels=config.kv_channels,
        attention_head_type=config.attention_head_type,
        seq_length=config.seq_length,
        max_position_embeddings=config.max_position_embeddings,
        padded_vocab_size=vocab,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        bias_gelu_fusion=True,
        openai_gelu=False,
        layernorm_epsilon=config.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tokenizer_type="TokenizerFromFile",
        tokenizer_file="/nonexistent/tokenizer.json",
    )


def _legacy_shard(name: str, tensor: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The spec's TP split of one full tensor under its legacy name."""
    dim0 = (
        "word_embeddings.weight",
        "query.weight",
        "query.bias",
        "query_key_value.weight",
        "query_key_value.bias",
        "dense_h_to_4h.weight",
        "dense_h_to_4h.bias",
    )
    if name.endswith(dim0):
        return tensor.chunk(tp, dim=0)[tp_rank].clone()
    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return tensor.chunk(tp, dim=1)[tp_rank].clone()
    return tensor.clone()


def write_legacy(root: Path, model: GPTModel, config: ModelConfig, vocab: int, *, tp=2, pp=2, release=False):
    """A BigCode-layout checkpoint of `model` at TP x PP, built from the spec's key layout."""
    state = model.state_dict()
    per_stage = config.num_layers // pp
    iteration_dir = root / ("release" if release else "iter_0000040")
    root.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else "40")
    for stage in range(pp):
        for t in range(tp):
            embedding, encoder = {}, {}
            if stage == 0:
                embedding["word_embeddings"] = {"weight": state["embedding.word_embeddings.weight"]}
                embedding["position_embeddings"] = {"weight": state["embedding.position_embeddings.weight"]}
            for local in range(per_stage):
                for name, tensor in state.items():
                    prefix = f"layers.{stage * per_stage + local}."
                    if name.startswith(prefix):
                        rest = name[len(prefix) :].replace("attention.", "self_attention.")
                        encoder[f"layers.{local}.{rest}"] = tensor
            if stage == pp - 1:
                encoder["final_layernorm.weight"] = state["final_layernorm.weight"]
                encoder["final_layernorm.bias"] = state["final_layernorm.bias"]
            language_model = {
                "embedding": {
                    k: {"weight": _legacy_shard(f"{k}.weight", v["weight"], t, tp)}
                    for k, v in embedding.items()
                },
                "encoder": {k: _legacy_shard(k, v, t, tp) for k, v in encoder.items()},
            }
            content = {
                "args": _legacy_args(config, vocab, tp, pp),
                "checkpoint_version": 3.0,
                "iteration": 0 if release else 40,
                "model": {"language_model": language_model},
                "rng_state": [
                    {"random_rng_state": None, "np_rng_state": np.random.RandomState(t).get_state()}
                ],
            }
            if stage == pp - 1 and pp > 1:
                word = state["embedding.word_embeddings.weight"]
                content["model"]["word_embeddings_for_head"] = {"weight": word.chunk(tp)[t].clone()}
            directory = iteration_dir / (f"mp_rank_{t:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            directory.mkdir(parents=True)
            torch.save(content, directory / "model_optim_rng.pt")
    return root


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_legacy_tp2_pp2_converts_to_the_same_logits(tmp_path, from_legacy, head_type):
    config = tiny_config(head_type)
    vocab = 256
    model = GPTModel(config, vocab)
    model.init_weights(21)
    write_legacy(tmp_path / "legacy", model, config, vocab, release=head_type == "multihead")
    ckpt = tmp_path / "ours"
    assert from_legacy.main(["--load", str(tmp_path / "legacy"), "--save", str(ckpt)]) == 0

    loaded = load_full_state(next(ckpt.glob("iter_*")))
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    common = json.loads(next(ckpt.glob("iter_*/common.json")).read_text())
    assert common["iteration"] == (0 if head_type == "multihead" else 40)
    rebuilt = GPTModel(ModelConfig(**common["config"]["model"]), vocab)
    rebuilt.load_state_dict(loaded)
    tokens = random_tokens(vocab=vocab, seed=4)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens), model.eval()(tokens))


def test_legacy_refuses_arbitrary_pickles_and_names_missing_files(tmp_path, from_legacy, capsys):
    from megatron.checkpoint.legacy import read_legacy_checkpoint

    config = tiny_config()
    model = GPTModel(config, 128)
    model.init_weights(1)
    write_legacy(tmp_path / "legacy", model, config, 128)
    victim = tmp_path / "legacy" / "iter_0000040" / "mp_rank_01_001" / "model_optim_rng.pt"
    victim.unlink()
    with pytest.raises(ValueError, match="mp_rank_01_001/model_optim_rng.pt: missing"):
        read_legacy_checkpoint(tmp_path / "legacy")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    victim.write_bytes(b"")
    torch.save({"args": Exploit()}, victim, pickle_module=pickle)
    out = tmp_path / "ours"
    assert from_legacy.main(["--load", str(tmp_path / "legacy"), "--save", str(out)]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    assert "mp_rank_01_001/model_optim_rng.pt: refused" in captured.err
    assert_nothing_written(out)


# --------------------------------------------------------------------------- bad input


def test_non_gpt_bigcode_directory_is_rejected(tmp_path, from_hf, capsys):
    hf_dir = tmp_path / "llama"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    out = tmp_path / "ours"
    assert from_hf.main(["--load", str(hf_dir), "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "llama" in err and "GPTBigCode" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_hf_weights_with_missing_or_misshaped_keys_are_named(
    tmp_path, from_hf, tiny_tokenizer_path, damage, capsys
):
    hf_dir = make_hf_dir(tmp_path / "hf", tiny_tokenizer_path)
    weights = safetensors_torch.load_file(str(hf_dir / "model.safetensors"))
    if damage == "missing":
        del weights["transformer.h.1.mlp.c_fc.bias"]
    else:
        weights["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(7)
    safetensors_torch.save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ours"
    assert from_hf.main(["--load", str(hf_dir), "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "transformer.h.1.mlp.c_fc.bias" in err
    assert ("missing" in err) if damage == "missing" else ("c_fc.bias: weights [7], model [256]" in err)
    assert_nothing_written(out)


def test_layout_that_does_not_divide_is_named(tmp_path, from_hf, tiny_tokenizer_path, capsys):
    hf_dir = make_hf_dir(tmp_path / "hf", tiny_tokenizer_path)
    out = tmp_path / "ours"
    assert (
        from_hf.main(["--load", str(hf_dir), "--save", str(out), "--pipeline-model-parallel-size", "3"]) == 2
    )
    assert "n_layer 2 is not divisible by --pipeline-model-parallel-size 3" in capsys.readouterr().err
    assert_nothing_written(out)


def test_vocabulary_mismatch_is_rejected(tmp_path, to_hf, tiny_tokenizer_path, capsys):
    config = tiny_config()
    model = GPTModel(config, 128)  # smaller than the 1024-token tokenizer
    model.init_weights(1)
    save_ours(tmp_path / "ckpt", model, run_config(config, tiny_tokenizer_path))
    out = tmp_path / "hf"
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vocabulary mismatch" in err and "1024 tokens" in err and "128 embedding rows" in err
    assert_nothing_written(out)


def test_checkpoint_not_matching_its_config_names_the_key(tmp_path, to_hf, tiny_tokenizer_path, capsys):
    model = GPTModel(tiny_config(), TINY_VOCAB_SIZE)
    model.init_weights(1)
    save_ours(tmp_path / "ckpt", model, run_config(tiny_config(num_layers=3), tiny_tokenizer_path))
    out = tmp_path / "hf"
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(out)]) == 2
    assert "missing model/layers.2." in capsys.readouterr().err
    assert_nothing_written(out)


def test_library_mapping_errors_are_value_errors():
    from megatron.checkpoint.gpt_bigcode import from_gpt_bigcode_state_dict, model_config_from_gpt_bigcode

    with pytest.raises(ValueError, match=r"x/config.json: model_type 'gpt2'"):
        model_config_from_gpt_bigcode(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "x/config.json"
        )
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        model_config_from_gpt_bigcode({"model_type": "gpt_bigcode", "activation_function": "relu"})
    with pytest.raises(ValueError, match="transformer.wpe.weight: missing from the weights"):
        from_gpt_bigcode_state_dict({"transformer.wte.weight": torch.zeros(8, 64)}, tiny_config())


def test_existing_output_is_not_overwritten(tmp_path, to_hf, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert to_hf.main(["--load", str(tmp_path), "--save", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf", "convert_legacy"])
def test_tools_have_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(["--help"])
    assert exit_info.value.code == 0
    assert "--save" in capsys.readouterr().out

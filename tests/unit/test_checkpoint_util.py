"""tools/checkpoint_util.py (info, verify, consolidate) and generation from sharded checkpoints.

Checkpoints are written by `megatron.checkpoint.Checkpointer` from a tiny model after one real
training step (so Adam moments exist), in one process and, for the layout-free reading, at TP 2 (two
gloo ranks). Consolidated tensors must equal the saved ones exactly: consolidation only copies bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch

from tests.helpers import load_tool, tiny_model_config

VOCAB = 1024  # >= the tiny tokenizer's vocabulary, so tools/generate.py can use it
SEQ = 16
ITERATION = 7


def _config_dict(tokenizer_file: str | None = None) -> dict:
    from megatron.config import Config, DataConfig

    data = DataConfig(tokenizer_type="TokenizerFromFile", tokenizer_file=tokenizer_file)
    return Config(model=tiny_model_config(hidden_size=32, seq_length=SEQ), data=data).to_dict()


def _batch(seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (2, SEQ + 1), generator=generator)
    return [
        {
            "tokens": data[:, :-1],
            "labels": data[:, 1:],
            "loss_mask": torch.ones(2, SEQ),
            "position_ids": torch.arange(SEQ).expand(2, SEQ),
        }
    ]


def _trained(parallel_state):
    """(model, optimizer, scheduler) of the tiny model after one training step."""
    from megatron.config import OptimizerConfig
    from megatron.model import GPTModel
    from megatron.training.optimizer import build_optimizer
    from megatron.training.schedule import build_scheduler
    from megatron.training.step import train_step

    model = GPTModel(tiny_model_config(hidden_size=32, seq_length=SEQ), VOCAB, parallel_state)
    model.init_weights(1234)
    optimizer_config = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)
    optimizer = build_optimizer(model, optimizer_config, parallel_state=parallel_state)
    scheduler = build_scheduler(
        optimizer, optimizer_config, train_iters=10, train_samples=None, global_batch_size=2
    )
    train_step(model, optimizer, _batch(0), parallel_state)
    scheduler.step(2)
    return model, optimizer, scheduler


def _save(parallel_state, root, config: dict):
    from megatron.checkpoint import Checkpointer

    model, optimizer, scheduler = _trained(parallel_state)
    Checkpointer(parallel_state).save(
        root, ITERATION, model, optimizer, scheduler, None, consumed_samples=14, config=config
    )
    return model, optimizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer_path):
    """(--save directory, model, optimizer) of a one-process checkpoint at iteration 7."""
    from megatron.parallel.state import ParallelState

    root = tmp_path_factory.mktemp("checkpoint_util") / "ckpt"
    model, optimizer = _save(ParallelState.single("cpu"), root, _config_dict(str(tiny_tokenizer_path)))
    return root, model, optimizer


@pytest.fixture(scope="module")
def tool():
    return load_tool("checkpoint_util")


def _iteration_dir(root: Path) -> Path:
    return root / f"iter_{ITERATION:07d}"


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()  # noqa: SIM118


# --------------------------------------------------------------------------------------------------
# help, info, verify


def test_help_says_checkpoints_are_layout_free(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "layout-free" in out and "no layout conversion is needed" in out.lower()
    for command in ("info", "verify", "consolidate"):
        assert command in out


def test_info_shows_iteration_layout_and_tensor_groups(tool, saved, capsys):
    root, model, _ = saved
    assert tool.main(["info", str(root), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert f"iteration {ITERATION}, consumed samples 14" in out
    assert "saved at TP 1 x PP 1 x DP 1 (world 1)" in out
    assert "model/" in out and "optimizer/exp_avg/" in out and "optimizer/exp_avg_sq/" in out
    for name, _ in model.named_parameters():
        assert f"model/{name}" in out
    assert "(tracked" in out  # the listing of checkpoints under the --save directory


def test_verify_passes_then_names_a_bit_flipped_shard(tool, saved, tmp_path, capsys):
    root, _, _ = saved
    assert tool.main(["verify", str(root)]) == 0
    assert "OK" in capsys.readouterr().out

    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    shard = sorted(_iteration_dir(copy).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert tool.main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and shard.name in out


def test_verify_all_and_missing_metadata(tool, saved, tmp_path, capsys):
    root, _, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    assert tool.main(["verify", str(copy), "--all"]) == 0
    (_iteration_dir(copy) / ".metadata").unlink()
    assert tool.main(["verify", str(copy), "--all"]) == 1
    assert ".metadata" in capsys.readouterr().out


def test_usage_errors_exit_2_naming_the_problem(tool, saved, tmp_path, capsys):
    root, _, _ = saved
    assert tool.main(["info", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tool.main(["info", str(tmp_path)]) == 2  # an empty directory: no tracker, no .metadata
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
    assert tool.main(["consolidate", str(root), "--output", str(tmp_path / "model.bin")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and ".safetensors or .pt" in err
    assert tool.main(["info", str(root), "--iteration", "3"]) == 2
    assert "iter_0000003" in capsys.readouterr().err


def test_crafted_metadata_is_refused_not_unpickled(tool, saved, tmp_path, capsys):
    # DCP pickles `.metadata`; this tool reads it with an allow-list, so a crafted file runs nothing.
    root, _, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (_iteration_dir(copy) / ".metadata").write_bytes(__import__("pickle").dumps(Exploit()))
    with pytest.raises(tool.VerificationError, match="not allowed"):
        tool.read_metadata(_iteration_dir(copy))
    assert (
        tool.main(["consolidate", str(copy), "--output", str(tmp_path / "m.safetensors"), "--skip-verify"])
        == 1
    )
    assert not marker.exists()
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# consolidate


def test_consolidate_safetensors_equals_the_model(tool, saved, tmp_path, capsys):
    from megatron.model import GPTModel

    root, model, _ = saved
    output = tmp_path / "model.safetensors"
    assert tool.main(["consolidate", str(root), "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors, metadata = _read_safetensors(output)
    expected = dict(model.named_parameters())
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name].detach()), name
    assert metadata["format"] == "pt" and metadata["iteration"] == str(ITERATION)
    assert json.loads(metadata["config"])["model"]["hidden_size"] == 32
    fresh = GPTModel(tiny_model_config(hidden_size=32, seq_length=SEQ), VOCAB)
    fresh.load_state_dict(tensors)  # strict: exactly the model's names and shapes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_consolidate_streams_one_tensor_at_a_time(tool, saved, tmp_path, monkeypatch):
    # Stand in for the checkpoint reader: hand out fresh tensors and check that each one handed out
    # before is already freed when the next is requested (the writer keeps none of them).
    import megatron.checkpoint as sharded

    root, _, _ = saved
    full = sharded.load_full_state(_iteration_dir(root), "model/")
    alive_at_request: list[int] = []

    def one_at_a_time(directory, prefix="model/", **kwargs):
        handed_out: list[weakref.ref] = []
        for name in list(full):
            alive_at_request.append(sum(ref() is not None for ref in handed_out))
            tensor = full[name].clone()
            handed_out.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    monkeypatch.setattr(sharded, "iter_tensors", one_at_a_time)
    output = tmp_path / "model.safetensors"
    assert tool.main(["consolidate", str(root), "--output", str(output), "--skip-verify"]) == 0
    assert len(alive_at_request) == len(full) and max(alive_at_request) == 0
    tensors, _ = _read_safetensors(output)
    names = {(name[len("model/") :] if name.startswith("model/") else name) for name in full}
    assert set(tensors) == names


def test_safetensors_header_is_aligned_and_contiguous(tool, saved, tmp_path):
    root, _, _ = saved
    output = tmp_path / "all.safetensors"
    assert tool.main(["consolidate", str(root), "--output", str(output), "--prefix", ""]) == 0
    with open(output, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    assert (8 + length) % 8 == 0
    spans = sorted(tuple(info["data_offsets"]) for name, info in header.items() if name != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    itemsize = {"F32": 4, "F64": 8, "I64": 8, "U8": 1, "BF16": 2, "F16": 2, "I32": 4}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % itemsize[info["dtype"]] == 0, name
    assert output.stat().st_size == 8 + length + spans[-1][1]


def test_consolidate_everything_keeps_optimizer_state(tool, saved, tmp_path):
    root, model, optimizer = saved
    output = tmp_path / "all.safetensors"
    assert tool.main(["consolidate", str(root), "--output", str(output), "--prefix", ""]) == 0
    tensors, _ = _read_safetensors(output)
    for name, param in model.named_parameters():
        assert torch.equal(tensors[f"model/{name}"], param.detach())
        state = optimizer.optimizer.state[param]
        assert torch.equal(tensors[f"optimizer/exp_avg/{name}"], state["exp_avg"])
        assert torch.equal(tensors[f"optimizer/exp_avg_sq/{name}"], state["exp_avg_sq"])
    assert any(name.startswith("rng/") for name in tensors)


def test_consolidate_pt_loads_with_weights_only(tool, saved, tmp_path):
    root, model, _ = saved
    output = tmp_path / "model.pt"
    assert tool.main(["consolidate", str(root), "--output", str(output), "--dtype", "bf16"]) == 0
    payload = torch.load(output, map_location="cpu", weights_only=True)
    assert payload["iteration"] == ITERATION and payload["config"]["model"]["num_layers"] == 2
    expected = dict(model.named_parameters())
    assert payload["tensors"].keys() == expected.keys()
    for name, tensor in payload["tensors"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].detach().to(torch.bfloat16)), name
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # staging file removed


# --------------------------------------------------------------------------------------------------
# generation reads sharded checkpoints (and still basic ones)


def test_generate_from_a_sharded_checkpoint(saved):
    from megatron.inference.generate import generate_ids, load_model_from_checkpoint

    root, model, _ = saved
    for where in (root, _iteration_dir(root)):
        loaded = load_model_from_checkpoint(where)
        assert not loaded.training
        for name, param in loaded.named_parameters():
            assert torch.equal(param, dict(model.named_parameters())[name]), name
        assert generate_ids(loaded, [1, 2, 3], 4) == generate_ids(model, [1, 2, 3], 4)


def test_generate_refuses_a_truncated_shard(saved, tmp_path):
    from megatron.inference.generate import load_model_from_checkpoint

    root, _, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    shard = sorted(_iteration_dir(copy).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=shard.name):
        load_model_from_checkpoint(copy)


def test_generate_tool_end_to_end_on_sharded_and_basic(saved, tmp_path, capsys, tiny_tokenizer_path):
    from megatron.checkpoint.single_file import save_checkpoint

    root, model, _ = saved
    generate = load_tool("generate")
    assert generate.main(["--load", str(root), "--prompt", "def f(x):", "--max-new-tokens", "3"]) == 0
    sharded_out = capsys.readouterr().out
    assert "--- greedy completion ---" in sharded_out
    save_checkpoint(
        tmp_path / "basic", ITERATION, model, None, None, None, 0, _config_dict(str(tiny_tokenizer_path))
    )
    assert (
        generate.main(["--load", str(tmp_path / "basic"), "--prompt", "def f(x):", "--max-new-tokens", "3"])
        == 0
    )
    assert capsys.readouterr().out == sharded_out  # the same weights give the same completion
    assert generate.main(["--load", str(tmp_path / "none"), "--prompt", "x"]) == 2


# --------------------------------------------------------------------------------------------------
# a checkpoint saved at TP 2 reads back whole (layout-free)


def _save_at_tp2(root: str) -> dict:
    from megatron.parallel.state import ParallelState

    state = ParallelState.initialize(2, 1, backend="gloo")
    model, _ = _save(state, Path(root), _config_dict())
    return {
        name: (
            param.detach().clone(),
            getattr(param, "partition_dim", -1),
            getattr(param, "tensor_model_parallel", False),
        )
        for name, param in model.named_parameters()
    }


def test_consolidate_and_generate_from_a_tp2_checkpoint(tool, tmp_path):
    from megatron.inference.generate import load_model_from_checkpoint
    from megatron.parallel.testing import run_distributed

    root = tmp_path / "ckpt"
    shards = run_distributed(_save_at_tp2, 2, str(root), timeout=240)
    full = {}
    for name, (tensor, dim, split) in shards[0].items():
        full[name] = torch.cat([shards[0][name][0], shards[1][name][0]], dim=dim) if split else tensor
    output = tmp_path / "model.safetensors"
    assert tool.main(["consolidate", str(root), "--output", str(output)]) == 0
    tensors, _ = _read_safetensors(output)
    assert tensors.keys() == full.keys()
    for name in full:
        assert torch.equal(tensors[name], full[name]), name
    loaded = load_model_from_checkpoint(root)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, full[name]), name

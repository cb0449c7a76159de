"""Training spine: lr schedule, clipping, loss scaling, mixed precision, accumulation, the train loop,
reproducibility, non-finite handling and basic checkpoint resume. Tiny fp32 models (hidden 64, 2 layers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron.config import OptimizerConfig
from megatron.parallel.state import ParallelState
from megatron.training.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.training.optimizer import build_optimizer, clip_grad_norm
from megatron.training.schedule import build_scheduler
from megatron.training.step import train_step
from tests.helpers import tiny_model_config

CPU = ParallelState.single("cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ = 16
VOCAB = 128


# --------------------------------------------------------------------------- lr schedule
def _lr_at(style: str, iteration: int, *, global_batch: int = 4) -> float:
    """lr after `iteration` optimizer steps with lr 1.0 -> 0.1 over 110 iterations, 10 warmup."""
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=110, lr_decay_style=style)
    scheduler = build_scheduler(
        None, opt, train_iters=200, train_samples=None, global_batch_size=global_batch
    )
    return scheduler.get_lr(iteration * global_batch)


@pytest.mark.parametrize(
    ("style", "iteration", "expected"),
    [
        ("cosine", 0, 0.0),  # warmup starts at 0
        ("cosine", 5, 0.5),  # half-way through warmup
        ("cosine", 10, 1.0),  # end of warmup: peak
        ("cosine", 35, 0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.25) + 1)),  # 0.868198
        ("cosine", 60, 0.55),  # decay ratio 0.5: cos term 0
        ("cosine", 110, 0.1),  # end of decay
        ("cosine", 150, 0.1),  # min_lr after the decay
        ("linear", 5, 0.5),
        ("linear", 35, 0.775),  # 0.1 + 0.75 * 0.9
        ("linear", 60, 0.55),
        ("linear", 110, 0.1),
        ("linear", 111, 0.1),
        ("constant", 5, 0.5),
        ("constant", 60, 1.0),
        ("constant", 150, 1.0),
    ],
)
def test_schedule_values(style, iteration, expected):
    assert _lr_at(style, iteration) == pytest.approx(expected, abs=1e-12)


def test_schedule_decay_equal_to_warmup():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4, lr_decay_iters=4, lr_decay_style="cosine")
    scheduler = build_scheduler(None, opt, train_iters=4, train_samples=None, global_batch_size=1)
    assert [scheduler.get_lr(i) for i in (0, 2, 4, 5)] == [0.0, 0.5, 1.0, 0.1]


def test_schedule_warmup_fraction_samples_and_stepping():
    opt = OptimizerConfig(
        lr=2.0, min_lr=0.0, lr_warmup_fraction=0.1, lr_decay_iters=100, lr_decay_style="linear"
    )
    param = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.SGD([param], lr=123.0)
    scheduler = build_scheduler(torch_opt, opt, train_iters=100, train_samples=None, global_batch_size=2)
    assert scheduler.warmup_steps == 20 and scheduler.decay_steps == 200  # in samples
    assert torch_opt.param_groups[0]["lr"] == 0.0  # set on construction
    for _ in range(5):
        scheduler.step(2)
    assert torch_opt.param_groups[0]["lr"] == pytest.approx(1.0)  # 5 of 10 warmup iterations
    restored = build_scheduler(None, opt, train_iters=100, train_samples=None, global_batch_size=2)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_lr() == scheduler.get_lr()
    # --train-samples: warmup/decay counted in samples directly
    opt_samples = OptimizerConfig(lr=1.0, lr_warmup_samples=30, lr_decay_samples=130, lr_decay_style="linear")
    by_samples = build_scheduler(None, opt_samples, train_iters=None, train_samples=200, global_batch_size=8)
    assert by_samples.get_lr(15) == pytest.approx(0.5)
    assert by_samples.get_lr(80) == pytest.approx(0.5)


# --------------------------------------------------------------------------- clipping
def _params_with_grads(values, tensor_parallel):
    params = []
    for value, split in zip(values, tensor_parallel, strict=True):
        param = torch.nn.Parameter(torch.zeros(len(value)))
        param.grad = torch.tensor(value)
        param.tensor_model_parallel = split
        params.append(param)
    return params


def test_clip_grad_norm_computes_and_applies_global_norm():
    params = _params_with_grads([[3.0, 0.0], [4.0]], [False, False])
    grads = [p.grad for p in params]
    norm = clip_grad_norm(params, grads, max_norm=1.0, parallel_state=CPU)
    assert norm == pytest.approx(5.0)
    clipped = torch.cat([g for g in grads]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)
    assert grads[0][0].item() == pytest.approx(3.0 / 5.0, rel=1e-5)
    # under the threshold: norm reported, grads untouched
    params = _params_with_grads([[3.0, 0.0], [4.0]], [False, False])
    grads = [p.grad for p in params]
    assert clip_grad_norm(params, grads, max_norm=10.0, parallel_state=CPU) == pytest.approx(5.0)
    assert grads[1].item() == 4.0


def test_clip_grad_norm_counts_replicated_params_on_tp_rank_zero_only():
    rank1 = ParallelState(
        device=torch.device("cpu"), tensor_model_parallel_size=2, tensor_model_parallel_rank=1
    )
    params = _params_with_grads([[3.0, 0.0], [4.0]], [True, False])
    norm = clip_grad_norm(params, [p.grad for p in params], max_norm=0.0, parallel_state=rank1)
    assert norm == pytest.approx(3.0)  # the replicated [4.0] is counted by TP rank 0


# --------------------------------------------------------------------------- loss scaler
def test_dynamic_scaler_hysteresis_backoff_and_growth():
    scaler = DynamicGradScaler(initial_scale=1024.0, min_scale=256.0, growth_interval=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 1024.0  # first overflow absorbed by hysteresis
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0
    scaler.update(found_inf=True)
    assert scaler.scale == 256.0
    scaler.update(found_inf=True)
    assert scaler.scale == 256.0  # floor at min_scale
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 512.0  # doubled after loss_scale_window clean steps
    state = scaler.state_dict()
    other = DynamicGradScaler(initial_scale=2.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert ConstantGradScaler(8.0).scale == 8.0


# --------------------------------------------------------------------------- tiny model helpers
def _tiny_model(dtype=torch.float32, seed=1):
    from megatron.model import GPTModel

    model = GPTModel(tiny_model_config(seq_length=SEQ), VOCAB)
    model.init_weights(seed)
    return model.to(dtype)


def _opt_config(**overrides) -> OptimizerConfig:
    values = {"lr": 1e-3, "weight_decay": 0.1, "clip_grad": 1.0}
    values.update(overrides)
    return OptimizerConfig(**values)


def _batch(num_sequences: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (num_sequences, SEQ + 1), generator=generator)
    loss_mask = (torch.rand(num_sequences, SEQ, generator=generator) > 0.3).float()  # unequal counts
    return {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(num_sequences, SEQ),
    }


def _split(batch: dict, num_micro_batches: int) -> list[dict]:
    size = batch["tokens"].shape[0] // num_micro_batches
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(num_micro_batches)]


def test_weight_decay_groups_follow_no_weight_decay_attribute():
    model = _tiny_model()
    optimizer = build_optimizer(model, _opt_config(), parallel_state=CPU)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in no_decay_ids) == bool(getattr(param, "no_weight_decay", False)), name
    assert len(no_decay_ids) > 0


def test_accumulation_micro1x4_equals_micro4x1():
    """The loss is the token mean over the global batch, so cutting it into micro-batches changes only
    the fp32 summation order: gradients agree to rtol 1e-5 / atol 1e-8 (observed ~1e-7 relative), even
    with unequal loss-mask counts per micro-batch (where Megatron's mean of micro-batch means would not)."""
    batch = _batch(4)
    results = []
    for num_micro in (1, 4):
        model = _tiny_model()
        optimizer = build_optimizer(model, _opt_config(clip_grad=0.0), parallel_state=CPU)
        output = train_step(model, optimizer, _split(batch, num_micro), CPU)
        results.append((output, [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.lm_loss == pytest.approx(out_b.lm_loss, rel=1e-6)
    assert out_a.num_loss_tokens == out_b.num_loss_tokens == int(batch["loss_mask"].sum())
    assert out_a.grad_norm == pytest.approx(out_b.grad_norm, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the per-micro-batch mean (Megatron's definition) differs here, so the test can tell them apart
    counts = batch["loss_mask"].sum(dim=1)
    assert counts.unique().numel() > 1


def test_loss_is_global_token_mean():
    model = _tiny_model()
    batch = _batch(4, seed=3)
    with torch.no_grad():
        token_losses = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"])
    expected = (token_losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    optimizer = build_optimizer(model, _opt_config(), parallel_state=CPU)
    output = train_step(model, optimizer, _split(batch, 2), CPU)
    assert output.lm_loss == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------- fp16 / bf16
def test_fp16_overflow_skips_step_counts_and_reduces_scale():
    model = _tiny_model(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicGradScaler(initial_scale=2.0**40, min_scale=1.0, growth_interval=1000, hysteresis=1)
    optimizer = build_optimizer(model, _opt_config(), grad_scaler=scaler, parallel_state=CPU)
    outputs = [train_step(model, optimizer, [_batch(2)], CPU) for _ in range(3)]
    # loss * 2**40 overflows fp16 gradients: each step is skipped and the scale halves
    assert all(o.overflow and not o.update_successful and o.nonfinite is None for o in outputs)
    assert scaler.scale == 2.0**37
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, old)
    # injected inf in an fp32 main grad at a sane scale: skipped too
    scaler.scale = 1024.0
    optimizer.zero_grad()
    next(iter(model.parameters())).main_grad.fill_(float("inf"))
    assert optimizer.step().found_inf and scaler.scale == 512.0


def test_fp16_step_succeeds_with_sane_scale():
    model = _tiny_model(torch.float16)
    optimizer = build_optimizer(
        model, _opt_config(), grad_scaler=ConstantGradScaler(128.0), parallel_state=CPU
    )
    output = train_step(model, optimizer, [_batch(2)], CPU)
    assert output.update_successful and math.isfinite(output.grad_norm)
    assert optimizer.loss_scale == 128.0


def test_bf16_master_weights_and_fp32_accumulation():
    model = _tiny_model(torch.bfloat16)
    optimizer = build_optimizer(model, _opt_config(lr=1e-2), parallel_state=CPU)
    assert optimizer.mixed
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in optimizer.main_params)
    first = [m.detach().clone() for m in optimizer.main_params]
    output = train_step(model, optimizer, _split(_batch(4), 2), CPU)
    assert output.update_successful
    for param, main in zip(model.parameters(), optimizer.main_params, strict=True):
        assert param.grad is None and param.main_grad.dtype == torch.float32  # accumulated in fp32
        assert torch.equal(param.detach(), main.detach().to(torch.bfloat16))  # copied back, rounded
    assert any(not torch.equal(m, o) for m, o in zip(optimizer.main_params, first, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_steps_on_cuda_learn_a_batch():
    cuda = ParallelState.single("cuda")
    model = _tiny_model(torch.bfloat16).cuda()
    optimizer = build_optimizer(model, _opt_config(lr=1e-2), parallel_state=cuda)
    micro_batches = [{k: v.cuda() for k, v in b.items()} for b in _split(_batch(4), 2)]
    losses = [train_step(model, optimizer, micro_batches, cuda).lm_loss for _ in range(10)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.9 * losses[0]  # bf16 compute with fp32 masters still fits one batch


# --------------------------------------------------------------------------- greedy generation
def test_greedy_generate_matches_argmax_and_stops():
    from megatron.inference.generate import generate_ids

    model = _tiny_model()
    prompt = [5, 17, 42, 7]
    ids = generate_ids(model, prompt, 6, vocab_size=100)
    assert len(ids) == 6 and all(0 <= i < 100 for i in ids)
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1, :100].argmax().item()
    assert ids[0] == first
    stop = ids[-1]
    assert generate_ids(model, prompt, 6, vocab_size=100, stop_id=stop) == ids[: ids.index(stop)]
    long_prompt = list(range(SEQ + 5))  # longer than the positions: only the last SEQ tokens are seen
    assert len(generate_ids(model, long_prompt, 2)) == 2


# --------------------------------------------------------------------------- checkpoint (unit level)
def test_basic_checkpoint_roundtrip(tmp_path):
    from megatron.checkpoint.directory import TRACKER_FILENAME
    from megatron.checkpoint.single_file import load_checkpoint, save_checkpoint

    model = _tiny_model()
    scaler = DynamicGradScaler(initial_scale=64.0, min_scale=1.0, growth_interval=10, hysteresis=2)
    optimizer = build_optimizer(model, _opt_config(), parallel_state=CPU)
    scheduler = build_scheduler(
        optimizer, _opt_config(lr_warmup_iters=2), train_iters=10, train_samples=None, global_batch_size=2
    )
    train_step(model, optimizer, [_batch(2)], CPU)
    scheduler.step(2)
    scaler.update(found_inf=True)
    directory = save_checkpoint(tmp_path, 7, model, optimizer, scheduler, scaler, 14, {"a": 1})
    assert directory.name == "iter_0000007"
    assert (tmp_path / TRACKER_FILENAME).read_text() == "7"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    fresh = _tiny_model(seed=99)
    fresh_opt = build_optimizer(fresh, _opt_config(), parallel_state=CPU)
    fresh_sched = build_scheduler(
        fresh_opt, _opt_config(lr_warmup_iters=2), train_iters=10, train_samples=None, global_batch_size=2
    )
    fresh_scaler = DynamicGradScaler(initial_scale=64.0, min_scale=1.0, growth_interval=10, hysteresis=2)
    loaded = load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, fresh_scaler)
    assert (loaded.iteration, loaded.consumed_samples) == (7, 14)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_sched.num_steps == 2 and fresh_scaler.state_dict() == scaler.state_dict()
    assert (
        fresh_opt.optimizer.state_dict()["state"].keys() == optimizer.optimizer.state_dict()["state"].keys()
    )
    assert load_checkpoint(tmp_path / "empty", fresh) is None


def test_generate_from_a_saved_checkpoint(tmp_path):
    from megatron.checkpoint.single_file import save_checkpoint
    from megatron.config import Config
    from megatron.inference.generate import generate_ids, load_model_from_checkpoint

    model = _tiny_model()
    config = Config(model=tiny_model_config(seq_length=SEQ))
    save_checkpoint(tmp_path, 3, model, None, None, None, 0, config.to_dict())
    loaded = load_model_from_checkpoint(tmp_path)
    assert not loaded.training
    assert generate_ids(loaded, [1, 2, 3], 4) == generate_ids(model, [1, 2, 3], 4)


# --------------------------------------------------------------------------- metrics sinks
def test_jsonl_writer_and_missing_optional_sinks(tmp_path, capsys):
    from megatron.config import LoggingConfig
    from megatron.training.metrics import build_metrics_logger

    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), wandb_project_name="p")
    metrics = build_metrics_logger(cfg, save_dir=str(tmp_path), config_dict={})
    metrics.write({"iteration": 1, "lm_loss": 2.5, "grad_norm": float("nan")}, 1)
    metrics.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"iteration": 1, "lm_loss": 2.5, "grad_norm": "nan"}
    out = capsys.readouterr().out
    for package in ("tensorboard", "wandb"):
        try:
            __import__(package)
        except ImportError:
            assert f"`{package}` is not installed" in out


# --------------------------------------------------------------------------- the real train loop
@pytest.fixture(scope="module")
def tiny_dataset(tiny_dataset_prefix) -> str:
    """The demo corpus preprocessed with the tiny tokenizer (session fixture in conftest.py)."""
    return tiny_dataset_prefix


def _loop_config(tmp_path, data_prefix, tokenizer_path, *extra: str):
    from megatron.config import load_config

    argv = (
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
        f"--seq-length {SEQ} --max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size 4 "
        "--train-iters 8 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 2 --lr-decay-style cosine "
        "--eval-interval 4 --eval-iters 1 --log-interval 2 --seed 7 --split 90,10,0 --num-workers 0 --fp32 "
        "--tokenizer-type TokenizerFromFile"
    ).split()
    argv += ["--data-path", data_prefix, "--tokenizer-file", str(tokenizer_path)]
    argv += ["--data-cache-path", str(tmp_path / "cache"), "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]
    argv += extra
    return load_config(argv)


def _train(cfg):
    from megatron.training.train import build_run, train

    run = build_run(cfg, CPU)
    try:
        summary = train(run)
    finally:
        run.metrics.close()
    return run, summary


def test_same_seed_gives_bit_identical_losses(tmp_path, tiny_dataset, tiny_tokenizer_path):
    """Through the real loop, with dropout on (so the dropout RNG stream is covered too)."""
    dropout = ("--attention-dropout", "0.1", "--hidden-dropout", "0.1")
    first, _ = _train(_loop_config(tmp_path / "a", tiny_dataset, tiny_tokenizer_path, *dropout))
    second, _ = _train(_loop_config(tmp_path / "b", tiny_dataset, tiny_tokenizer_path, *dropout))
    assert len(first.losses) == 8 and all(math.isfinite(x) for x in first.losses)
    assert first.losses == second.losses  # bit-identical floats
    other, _ = _train(
        _loop_config(tmp_path / "c", tiny_dataset, tiny_tokenizer_path, *dropout, "--seed", "8")
    )
    assert other.losses != first.losses


def test_train_loop_logs_metrics_and_evaluates(tmp_path, tiny_dataset, tiny_tokenizer_path, capsys):
    run, summary = _train(_loop_config(tmp_path, tiny_dataset, tiny_tokenizer_path))
    assert summary.iterations == 8 and summary.consumed_samples == 32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "lm_loss" in r]
    valid_lines = [r for r in records if "valid_lm_loss" in r]
    assert [r["iteration"] for r in train_lines] == [2, 4, 6, 8]
    assert [r["iteration"] for r in valid_lines] == [0, 4, 8]  # iteration 0, then every --eval-interval
    for key in (
        "consumed_samples",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "ms_per_iteration",
        "mfu",
        "tflops_per_device",
        "skipped_iterations",
    ):
        assert key in train_lines[0], key
    assert valid_lines[0]["valid_group"] == "valid"
    assert train_lines[-1]["lm_loss"] < train_lines[0]["lm_loss"]
    # lr used at iteration 2 (after one step of 2 warmup iterations) is half the peak
    assert train_lines[0]["lr"] == pytest.approx(0.5e-3)
    out = capsys.readouterr().out
    assert "iteration 2/8 | consumed samples: 8" in out.replace("  ", " ")
    assert "MFU reference:" in out


def _poison_call(number: int):
    """A forward hook turning the model's output to NaN on its `number`-th call."""
    calls = []

    def hook(module, args, output):
        calls.append(None)
        return output * float("nan") if len(calls) == number else output

    return hook


def test_nonfinite_loss_stops_with_iteration_named(tmp_path, tiny_dataset, tiny_tokenizer_path):
    from megatron.training.train import NonFiniteError, build_run, train

    one_micro_batch = ("--eval-iters", "0", "--micro-batch-size", "4")  # forward call i = iteration i
    run = build_run(_loop_config(tmp_path, tiny_dataset, tiny_tokenizer_path, *one_micro_batch), CPU)
    run.model.register_forward_hook(_poison_call(3))
    with pytest.raises(NonFiniteError, match="iteration 3: non-finite loss"):
        train(run)
    run.metrics.close()
    assert run.state.iteration == 2

    cfg = _loop_config(
        tmp_path / "skip", tiny_dataset, tiny_tokenizer_path, *one_micro_batch, "--skip-nonfinite"
    )
    run = build_run(cfg, CPU)
    run.model.register_forward_hook(_poison_call(3))
    summary = train(run)
    run.metrics.close()
    assert summary.iterations == 8 and summary.skipped_iterations == 1 and run.state.nonfinite_iterations == 1
    assert math.isnan(run.losses[2]) and all(math.isfinite(x) for i, x in enumerate(run.losses) if i != 2)


def test_save_load_resume_continues_identically(tmp_path, tiny_dataset, tiny_tokenizer_path):
    dropout = ("--hidden-dropout", "0.1")
    full, _ = _train(_loop_config(tmp_path / "full", tiny_dataset, tiny_tokenizer_path, *dropout))
    ckpt = str(tmp_path / "ckpt")
    first_half, _ = _train(
        _loop_config(
            tmp_path / "a",
            tiny_dataset,
            tiny_tokenizer_path,
            *dropout,
            "--save",
            ckpt,
            "--exit-interval",
            "4",
        )
    )
    assert first_half.state.iteration == 4 and (tmp_path / "ckpt" / "iter_0000004").is_dir()
    resumed, _ = _train(
        _loop_config(tmp_path / "b", tiny_dataset, tiny_tokenizer_path, *dropout, "--load", ckpt)
    )
    assert resumed.state.consumed_samples == 32
    assert first_half.losses == full.losses[:4]
    assert resumed.losses == full.losses[4:]  # bit-identical continuation
    # --finetune: weights only, iteration restarts at 0
    tuned, _ = _train(
        _loop_config(
            tmp_path / "c",
            tiny_dataset,
            tiny_tokenizer_path,
            *dropout,
            "--load",
            ckpt,
            "--finetune",
            "--train-iters",
            "2",
        )
    )
    assert len(tuned.losses) == 2 and tuned.losses[0] < full.losses[0]

"""Exact resume and resharding through the real training loop (build_run + train, sharded checkpoints).

Exact resume: 20 iterations straight equal 10 iterations, save, a fresh run that loads and trains 10 more,
bit for bit (losses and final weights), with dropout, FIM and a data-loader worker on: for one process
and for TP 2 x DP 2 with sequence parallelism and the distributed optimizer (4 gloo ranks).

Resharding: a checkpoint saved at TP 2 x PP 2 at iteration 10 resumes in one process and at DP 4; the
losses of iterations 11-20 equal the uninterrupted one-process run within 1e-5 relative (the layouts
order fp32 sums differently: see tests/distributed/test_parity.py). Dropout is off there: each layout
draws its dropout masks from differently shaped random streams.
"""

from __future__ import annotations

import os

import torch

from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed

ITERS, HALF = 20, 10
DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
NO_DROPOUT = ["--attention-dropout", "0.0", "--hidden-dropout", "0.0"]
LOSS_RTOL = 1e-5


def _config(workdir: str, dataset: str, tokenizer: str, *extra: str):
    from megatron.config import load_config

    argv = (
        "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
        "--seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 8 "
        f"--train-iters {ITERS} --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 3 --lr-decay-style cosine "
        "--eval-interval 10 --eval-iters 1 --log-interval 5 --seed 11 --split 90,10,0 --fp32 "
        "--fim-rate 0.5 --num-workers 1 --tokenizer-type TokenizerFromFile"
    ).split()
    argv += ["--data-path", dataset, "--tokenizer-file", tokenizer]
    argv += ["--data-cache-path", os.path.join(workdir, "cache")]
    return load_config([*argv, *extra])


def _run(state, workdir, dataset, tokenizer, *extra) -> dict:
    from megatron.parallel.layers import full_state_dict
    from megatron.training.train import build_run, train

    run = build_run(_config(workdir, dataset, tokenizer, *extra), state)
    try:
        train(run)
    finally:
        run.metrics.close()
    return {
        "losses": run.losses,
        "weights": full_state_dict(run.model, state),
        "iteration": run.state.iteration,
    }


def _resume_cycle(state, workdir, dataset, tokenizer, flags) -> dict:
    """Straight 20, then 10 + save, then load + 10, with `flags` (the layout's extra flags)."""
    ckpt = os.path.join(workdir, "ckpt")
    straight = _run(state, os.path.join(workdir, "straight"), dataset, tokenizer, *flags)
    first = _run(state, workdir, dataset, tokenizer, *flags, "--save", ckpt, "--exit-interval", str(HALF))
    resumed = _run(state, workdir, dataset, tokenizer, *flags, "--load", ckpt)
    return {"straight": straight, "first": first, "resumed": resumed}


def _four_ranks(workdir: str, dataset: str, tokenizer: str) -> dict:
    results = {}
    state = ParallelState.initialize(2, 1, sequence_parallel=True, backend="gloo")
    flags = [
        *DROPOUT,
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--use-distributed-optimizer",
    ]
    results["tp2xdp2"] = _resume_cycle(state, os.path.join(workdir, "tp2xdp2"), dataset, tokenizer, flags)
    # reshard source: TP 2 x PP 2 saves at iteration 10
    state = ParallelState.initialize(2, 2, backend="gloo")
    flags = [*NO_DROPOUT, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    ckpt = os.path.join(workdir, "tp2xpp2-ckpt")
    _run(
        state,
        os.path.join(workdir, "tp2xpp2"),
        dataset,
        tokenizer,
        *flags,
        "--save",
        ckpt,
        "--exit-interval",
        "10",
    )
    # ... and DP 4 resumes from it
    state = ParallelState.initialize(1, 1, backend="gloo")
    results["dp4-from-tp2xpp2"] = _run(
        state, os.path.join(workdir, "dp4"), dataset, tokenizer, *NO_DROPOUT, "--load", ckpt
    )
    return results


def _assert_exact(cycle: dict) -> None:
    straight, first, resumed = cycle["straight"], cycle["first"], cycle["resumed"]
    assert first["iteration"] == HALF and resumed["iteration"] == ITERS
    assert first["losses"] == straight["losses"][:HALF]
    assert resumed["losses"] == straight["losses"][HALF:]  # bit-identical continuation
    assert set(resumed["weights"]) == set(straight["weights"])
    for name, tensor in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


def test_exact_resume_one_process_and_tp2_dp2_and_reshard(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    dataset, tokenizer = tiny_dataset_prefix, str(tiny_tokenizer_path)
    single = ParallelState.single("cpu")
    _assert_exact(_resume_cycle(single, str(tmp_path / "one"), dataset, tokenizer, DROPOUT))

    per_rank = run_distributed(_four_ranks, 4, str(tmp_path / "four"), dataset, tokenizer, timeout=900)
    _assert_exact(per_rank[0]["tp2xdp2"])
    for other in per_rank[1:]:  # every rank reports the same losses
        assert other["tp2xdp2"]["resumed"]["losses"] == per_rank[0]["tp2xdp2"]["resumed"]["losses"]

    reference = _run(single, str(tmp_path / "reference"), dataset, tokenizer, *NO_DROPOUT)["losses"]
    ckpt = str(tmp_path / "four" / "tp2xpp2-ckpt")
    one_process = _run(single, str(tmp_path / "tp1"), dataset, tokenizer, *NO_DROPOUT, "--load", ckpt)
    for name, losses in (
        ("TP 1", one_process["losses"]),
        ("DP 4", per_rank[0]["dp4-from-tp2xpp2"]["losses"]),
    ):
        assert len(losses) == ITERS - HALF, name
        for got, expected in zip(losses, reference[HALF:], strict=True):
            assert abs(got - expected) <= LOSS_RTOL * expected, (name, losses, reference[HALF:])

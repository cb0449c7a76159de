"""Debug check (`--check-replicas-interval N`): replicated parameters must stay bit-identical.

Two kinds of replica exist. Across the tensor-parallel group, every parameter that is not split
(`tensor_model_parallel` False: the multi-query K/V projection, LayerNorms, row-parallel biases, position
embeddings) is held whole by every TP rank and must be the same bits everywhere; a missing gradient
reduction (the bug BigCode's first MQA run had) shows up here as a slow drift long before the loss
explodes. Across the data-parallel group, every parameter is replicated. Under pipeline parallelism the
tied word embedding exists on the first and the last stage and both copies must stay equal.

Each rank hashes each parameter's bytes (BLAKE2b, 8 bytes) and the hashes are all-gathered: a few bytes
per parameter cross the network, not the weights. The first parameter (in model order) whose hashes
differ is named with the ranks that disagree.
"""

from __future__ import annotations

import hashlib

import torch

from megatron.parallel.collectives import Group, all_gather_object, all_reduce


class ReplicaMismatchError(RuntimeError):
    """Replicated parameters differ across ranks (a bug in gradient reduction or in the update)."""


def fingerprint(tensor: torch.Tensor) -> str:
    """BLAKE2b-64 of the tensor's raw bytes (any dtype, any device)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()


def _first_mismatch(names: list[str], per_rank: list[list[str]], group: Group, what: str) -> str | None:
    for index, name in enumerate(names):
        hashes = [rank_hashes[index] for rank_hashes in per_rank]
        if len(set(hashes)) > 1:
            owners = {}
            for global_rank, value in zip(group.ranks, hashes, strict=True):
                owners.setdefault(value, []).append(global_rank)
            split = "; ".join(f"ranks {ranks}" for ranks in owners.values())
            return (
                f"parameter {name} is not bit-identical across {what} replicas: {split} hold different values"
            )
    return None


def check_replicas(model: torch.nn.Module, parallel_state, *, iteration: int | None = None) -> int:
    """Raise ReplicaMismatchError naming the first parameter whose replicas differ; returns the number of
    parameter replicas compared. Collective: every rank of the world must call it."""
    named = list(model.named_parameters())
    all_names = [name for name, _ in named]
    all_hashes = [fingerprint(param) for _, param in named]
    replicated = [not getattr(param, "tensor_model_parallel", False) for _, param in named]
    tp_names = [name for name, keep in zip(all_names, replicated, strict=True) if keep]
    tp_hashes = [value for value, keep in zip(all_hashes, replicated, strict=True) if keep]
    where = f" at iteration {iteration}" if iteration is not None else ""
    problems = []
    tp_group, dp_group = parallel_state.tp_group, parallel_state.dp_group
    if not tp_group.is_trivial:
        gathered = all_gather_object(tp_hashes, tp_group)
        problems.append(_first_mismatch(tp_names, gathered, tp_group, "tensor-parallel"))
    if not dp_group.is_trivial:
        gathered = all_gather_object(all_hashes, dp_group)
        problems.append(_first_mismatch(all_names, gathered, dp_group, "data-parallel"))
    tied = [
        (name, value)
        for (name, param), value in zip(named, all_hashes, strict=True)
        if getattr(param, "embedding_group_reduce", False)
    ]
    embedding_group = parallel_state.embedding_group
    if tied and not embedding_group.is_trivial:  # the word embedding on the first and last stage
        gathered = all_gather_object([value for _, value in tied], embedding_group)
        problems.append(
            _first_mismatch(
                [name for name, _ in tied], gathered, embedding_group, "pipeline (tied embedding)"
            )
        )
    problems = [problem for problem in problems if problem]
    # every rank stops, not only the ones in the group that disagrees (the rest would hang later)
    flag = torch.tensor([float(bool(problems))], device=parallel_state.device)  # NCCL needs the GPU
    found = all_reduce(flag, parallel_state.world_group)
    if problems:
        raise ReplicaMismatchError(f"replica check{where}: " + " | ".join(problems))
    if found.item() > 0:
        raise ReplicaMismatchError(f"replica check{where}: replicas differ on other ranks (see their error)")
    compared = len(tp_names) * (tp_group.size - 1) + len(all_names) * (dp_group.size - 1)
    compared += len(tied) * (embedding_group.size - 1)
    return compared

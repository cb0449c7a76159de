"""The model under pipeline parallelism against one process: stages built per pipeline rank, run in
order by hand (each stage's output handed to the next as a tensor, which is what the schedule's
send/recv does), compared with the one-process model in loss, logits and gradients.

One process for PP alone (a ParallelState per pipeline rank without process groups: building a stage and
running its chunks does not communicate over the pipeline), one spawn of 4 ranks (TP 2 x PP 2, on the
strict backend: gloo checking NCCL's rules) for tensor parallelism inside the stages, `full_state_dict`
over the real pipeline group, and recomputation at TP 2 with sequence parallelism.

Tolerances: pipeline parallelism alone runs the very same kernels on the same tensors in the same order
(the hidden state is just handed over), so loss, logits and gradients are compared bit for bit; the one
sum that differs in grouping is the tied word embedding's gradient, first-stage part + last-stage part,
a single fp32 addition (commutative, so also exact). Under TP the tolerance of test_tensor_parallel.py
applies (1e-5 relative to the largest entry: TP reorders fp32 sums).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_fixtures import BATCH, SEED, SEQ, VOCAB, batch, document_mask, relative_error

from megatron.config import ModelConfig, ParallelConfig
from megatron.model import GPTModel, build_model
from megatron.model.partition import all_pipeline_layer_ranges
from megatron.parallel import collectives
from megatron.parallel.collectives import Group
from megatron.parallel.layers import full_state_dict, gather_tensor
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.helpers import tiny_model_config

RTOL = 1e-5
WORD_EMBEDDING = "embedding.word_embeddings.weight"

# name: (pipeline size, num_layers, ParallelConfig layout flags, ModelConfig overrides)
LAYOUTS = {
    "pp2": (2, 4, {}, {}),
    "pp4": (4, 4, {}, {}),
    "pp2-interleaved": (2, 4, dict(num_layers_per_virtual_pipeline_stage=1), {}),
    "pp4-interleaved": (4, 8, dict(num_layers_per_virtual_pipeline_stage=1), {}),
    "pp2-uneven": (2, 4, dict(decoder_first_pipeline_num_layers=1), {}),
    "pp4-uneven": (4, 6, dict(decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=1), {}),
    "pp2-untied": (2, 4, {}, dict(untie_embeddings_and_output_weights=True)),
    "pp2-multihead": (2, 4, {}, dict(attention_head_type="multihead")),
}


def stage_state(pp: int, rank: int, base: ParallelState | None = None) -> ParallelState:
    """Pipeline rank `rank` of `pp` for building a stage in this process: `base`'s tensor-parallel part
    (None: TP 1) with the pipeline position replaced (no pipeline process group: a stage's forward and
    backward do not communicate over the pipeline)."""
    if base is None:
        base = ParallelState(device=torch.device("cpu"))
    return dataclasses.replace(
        base,
        world_size=base.tensor_model_parallel_size * pp,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_rank=rank,
        pp_group=Group(tuple(range(pp)), rank, None),
    )


def build_stages(
    cfg: ModelConfig, pp: int, layout: dict, base: ParallelState | None = None
) -> list[GPTModel]:
    parallel_config = ParallelConfig(pipeline_model_parallel_size=pp, **layout)
    stages = []
    for rank in range(pp):
        model = build_model(cfg, VOCAB, stage_state(pp, rank, base), parallel_config)
        model.init_weights(SEED)
        stages.append(model)
    return stages


def run_pipeline(stages: list[GPTModel], tokens, labels=None, position_ids=None, attention_mask=None):
    """Every virtual stage in pipeline order (chunk c of rank r is virtual stage c * pp + r), each
    output handed on to the next; returns the last one's output (loss or logits)."""
    x = None
    for chunk in range(stages[0].num_chunks):
        for model in stages:
            if model.chunk_is_first(chunk):
                x = model.forward_chunk(
                    chunk, tokens=tokens, position_ids=position_ids, attention_mask=attention_mask
                )
            else:
                x = model.forward_chunk(
                    chunk,
                    hidden=x,
                    attention_mask=attention_mask,
                    labels=labels if model.chunk_is_last(chunk) else None,
                )
    return x


def stage_gradients(stages: list[GPTModel], tp_group: Group | None = None) -> dict[str, torch.Tensor]:
    """Logical name -> gradient as one process holds it: `tp_grad_reduce` ones summed over TP, split ones
    gathered; the tied word embedding's two copies summed (what the embedding-group all-reduce does)."""
    grads: dict[str, torch.Tensor] = {}
    for model in stages:
        for name, param in model.named_parameters():
            grad = param.grad.clone()
            if tp_group is not None:
                if param.tp_grad_reduce:
                    collectives.all_reduce(grad, tp_group)
                grad = gather_tensor(grad, param, tp_group)
            if getattr(param, "embedding_group_reduce", False) and name in grads:
                grads[name] = grads[name] + grad
            else:
                assert name not in grads, f"{name} held by two stages"
                grads[name] = grad
    return grads


def reference_run(cfg: ModelConfig) -> dict:
    tokens, labels = batch()
    model = GPTModel(cfg, VOCAB)
    model.init_weights(SEED)
    loss = model(tokens, labels=labels)
    loss.mean().backward()
    with torch.no_grad():
        mask, positions = document_mask()
        masked_logits = model(tokens, position_ids=positions, attention_mask=mask)
    return {
        "loss": loss.detach(),
        "grads": {name: param.grad for name, param in model.named_parameters()},
        "masked_logits": masked_logits,
        "weights": full_state_dict(model),
    }


# ---------------------------------------------------------------------------- one process, PP alone


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_stages_equal_one_process(name):
    pp, num_layers, layout, overrides = LAYOUTS[name]
    cfg = tiny_model_config(num_layers=num_layers, **overrides)
    reference = reference_run(cfg)
    stages = build_stages(cfg, pp, layout)

    # init by logical name: every stage's weights are the one-process model's same-named weights
    for model in stages:
        for param_name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reference["weights"][param_name]), param_name
    held = [param_name for model in stages for param_name, _ in model.named_parameters()]
    assert sorted(set(held)) == sorted(reference["grads"])

    tokens, labels = batch()
    loss = run_pipeline(stages, tokens, labels)
    loss.mean().backward()
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), reference["loss"])
    grads = stage_gradients(stages)
    different = [n for n, g in reference["grads"].items() if not torch.equal(grads[n], g)]
    assert not different, f"gradients differ from one process: {different}"

    with torch.no_grad():
        mask, positions = document_mask()
        logits = run_pipeline(stages, tokens, position_ids=positions, attention_mask=mask)
    assert torch.equal(logits, reference["masked_logits"])


def test_stage_contents_and_tied_embedding_attributes():
    stages = build_stages(tiny_model_config(num_layers=8), 4, dict(num_layers_per_virtual_pipeline_stage=1))
    assert [model.chunk_ranges for model in stages] == [
        tuple(ranges) for ranges in all_pipeline_layer_ranges(8, 4, layers_per_virtual_stage=1)
    ]
    first, middle, last = stages[0], stages[1], stages[3]
    assert sorted(int(key) for key in first.layers) == [0, 4]
    assert first.layers[4] is first.layers["4"] and 4 in first.layers and 1 not in first.layers
    names = {
        model: {n for n, _ in model.named_parameters() if not n.startswith("layers.")} for model in stages
    }
    assert names[first] == {WORD_EMBEDDING, "embedding.position_embeddings.weight"}
    assert names[middle] == set()
    assert names[last] == {WORD_EMBEDDING, "final_layernorm.weight", "final_layernorm.bias"}
    first_copy = first.embedding.word_embeddings.weight
    last_copy = last.embedding.word_embeddings.weight
    assert first_copy.embedding_group_reduce and not getattr(first_copy, "pipeline_duplicate", False)
    assert last_copy.embedding_group_reduce and last_copy.pipeline_duplicate
    assert last.output_weight is last_copy
    # chunk roles: the embedding on the first rank's chunk 0, the head on the last rank's last chunk
    assert [(m.chunk_is_first(c), m.chunk_is_last(c)) for m in stages for c in range(2)] == [
        (True, False),
        (False, False),
        *[(False, False)] * 4,
        (False, False),
        (False, True),
    ]
    # the chunks' parameter lists partition each stage's parameters
    for model in stages:
        per_chunk = [name for c in range(model.num_chunks) for name, _ in model.chunk_named_parameters(c)]
        assert sorted(per_chunk) == sorted(name for name, _ in model.named_parameters())
    # no pipeline attribute at PP 1, nor on an untied model
    plain = GPTModel(tiny_model_config(num_layers=4), VOCAB)
    untied = build_stages(tiny_model_config(num_layers=4, untie_embeddings_and_output_weights=True), 2, {})
    for param in [*plain.parameters(), *untied[0].parameters(), *untied[1].parameters()]:
        assert not hasattr(param, "embedding_group_reduce") and not hasattr(param, "pipeline_duplicate")
    assert untied[1].embedding is None and untied[1].output_layer is not None


def test_chunk_inputs_and_whole_model_forward_are_checked():
    first, last = build_stages(tiny_model_config(num_layers=4), 2, {})
    tokens, labels = batch()
    with pytest.raises(
        RuntimeError, match=r"holds layers \(\(0, 2\),\) only; run its chunks with forward_chunk"
    ):
        first(tokens)
    with pytest.raises(ValueError, match=r"forward_chunk\(0\) takes tokens"):
        first.forward_chunk(0, hidden=torch.zeros(BATCH, SEQ, 64))
    with pytest.raises(ValueError, match=r"forward_chunk\(0\) takes hidden"):
        last.forward_chunk(0, tokens=tokens)
    hidden = first.forward_chunk(0, tokens=tokens)
    assert hidden.shape == first.pipeline_hidden_shape(BATCH, SEQ) == (BATCH, SEQ, 64)
    assert last.forward_chunk(0, hidden=hidden).shape == (BATCH, SEQ, VOCAB)
    sequence_parallel = dataclasses.replace(
        stage_state(2, 0),
        tensor_model_parallel_size=2,
        tp_group=Group((0, 1), 0, None),
        sequence_parallel=True,
    )
    model = build_model(tiny_model_config(num_layers=4), VOCAB, sequence_parallel, device="meta")
    assert model.pipeline_hidden_shape(BATCH, SEQ) == (BATCH, SEQ // 2, 64)


def test_model_and_config_share_the_layout_errors():
    with pytest.raises(
        ValueError, match="--num-layers 4 does not split evenly over --pipeline-model-parallel-size 3"
    ):
        build_stages(tiny_model_config(num_layers=4), 3, {})
    with pytest.raises(ValueError, match="--decoder-first-pipeline-num-layers 4"):
        build_stages(tiny_model_config(num_layers=4), 2, dict(decoder_first_pipeline_num_layers=4))


# ---------------------------------------------------------------------------- TP 2 x PP 2 (4 ranks)


def _tensor_parallel_stage_errors(state: ParallelState, head_type: str, sequence_parallel: bool) -> dict:
    """TP 2 x PP 2 (interleaved, 2 chunks per rank) run by hand on this rank's TP group against one
    process."""
    cfg = tiny_model_config(num_layers=4, attention_head_type=head_type)
    reference = reference_run(cfg)
    base = dataclasses.replace(state, sequence_parallel=sequence_parallel)
    stages = build_stages(cfg, 2, dict(num_layers_per_virtual_pipeline_stage=1), base)
    tokens, labels = batch()
    loss = run_pipeline(stages, tokens, labels)
    loss.mean().backward()
    errors = {"loss per token": relative_error(loss.detach(), reference["loss"])}
    for name, grad in stage_gradients(stages, state.tp_group).items():
        errors[f"grad {name}"] = relative_error(grad, reference["grads"][name])
    with torch.no_grad():
        mask, positions = document_mask()
        logits = run_pipeline(stages, tokens, position_ids=positions, attention_mask=mask)
    errors["logits with a document mask"] = relative_error(logits, reference["masked_logits"])
    return errors


def _recompute_is_bit_identical(state: ParallelState) -> dict:
    """TP 2 with sequence parallelism and dropout 0.3 (drawn from the default stream and the per-rank
    tracker): loss, every gradient and both streams' next draws without and with recomputation, on
    `state.device`."""
    device = state.device
    tokens, labels = batch()
    state = dataclasses.replace(
        state,
        sequence_parallel=True,
        pipeline_model_parallel_size=1,
        pipeline_model_parallel_rank=0,
        pp_group=Group(),
    )
    settings = {
        "none": {},
        "full-uniform-1": dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        ),
        "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
        "selective": dict(recompute_granularity="selective"),
    }
    results = {}
    for name, recompute in settings.items():
        for head_type in ("multiquery", "multihead"):
            state.seed(SEED)
            model = GPTModel(
                tiny_model_config(num_layers=4, dropout=0.3, attention_head_type=head_type, **recompute),
                VOCAB,
                state,
            )
            model.init_weights(SEED)
            loss = model.to(device).train()(tokens.to(device), labels=labels.to(device))
            loss.mean().backward()
            with state.rng.fork(device):
                tracker_next = torch.rand(4, device=device)
            results[(name, head_type)] = [
                loss.detach(),
                *(param.grad for param in model.parameters()),
                torch.rand(4, device=device),
                tracker_next,
            ]
    return {
        key: all(torch.equal(a, b) for a, b in zip(value, results[("none", key[1])], strict=True))
        for key, value in results.items()
    }


def _run_rank() -> dict:
    state = ParallelState.initialize(2, 2, backend="strict")  # gloo checking NCCL's rules
    # this rank's own stage (interleaved: two chunks), gathered over TP and PP
    cfg = tiny_model_config(num_layers=4)
    layout = ParallelConfig(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1
    )
    model = build_model(cfg, VOCAB, state, layout)
    model.init_weights(SEED)
    gathered, reference = full_state_dict(model, state), _initialised(cfg)
    result = {
        "pp_rank": state.pipeline_model_parallel_rank,
        "embedding_group": state.embedding_group.ranks,
        "full_state_dict_names": list(gathered),
        "reference_names": list(reference),
        "full_state_dict_equal": all(torch.equal(gathered[n], t) for n, t in reference.items()),
    }
    result["tp_pp_errors"] = {
        (head_type, sequence_parallel): _tensor_parallel_stage_errors(state, head_type, sequence_parallel)
        for head_type, sequence_parallel in (("multiquery", True), ("multihead", False))
    }
    result["recompute"] = _recompute_is_bit_identical(state)
    return result


def _initialised(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    model = GPTModel(cfg, VOCAB)
    model.init_weights(SEED)
    return full_state_dict(model)


@pytest.fixture(scope="module")
def tp2_pp2() -> list[dict]:
    return run_distributed(_run_rank, 4, timeout=300)


def test_full_state_dict_gathers_over_the_pipeline(tp2_pp2):
    for rank_result in tp2_pp2:
        # every name once (the last stage's duplicate word embedding skipped), in the one-process order
        assert rank_result["full_state_dict_names"] == rank_result["reference_names"]
        assert rank_result["full_state_dict_equal"]
    assert [r["pp_rank"] for r in tp2_pp2] == [0, 0, 1, 1]
    assert [r["embedding_group"] for r in tp2_pp2] == [(0, 2), (1, 3), (0, 2), (1, 3)]


@pytest.mark.parametrize(
    "key", [("multiquery", True), ("multihead", False)], ids=["multiquery-sp", "multihead"]
)
def test_tensor_and_pipeline_parallel_stages_equal_one_process(tp2_pp2, key):
    for rank_result in tp2_pp2:
        errors = rank_result["tp_pp_errors"][key]
        bad = {name: error for name, error in errors.items() if not error <= RTOL}
        assert not bad, f"relative errors above {RTOL}: {bad}"


def test_recomputation_at_tp2_with_sequence_parallelism_is_bit_identical(tp2_pp2):
    for rank_result in tp2_pp2:
        assert all(rank_result["recompute"].values()), rank_result["recompute"]


def _run_cuda_rank() -> dict:
    state = ParallelState.initialize(2, 1, sequence_parallel=True, backend="gloo", device="cuda:0")
    return _recompute_is_bit_identical(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recomputation_on_cuda_at_tp2_with_sequence_parallelism_is_bit_identical():
    """Two gloo ranks sharing one GPU (NCCL refuses that): the per-rank tracker's CUDA state is replayed."""
    for rank_result in run_distributed(_run_cuda_rank, 2, timeout=300):
        assert all(rank_result.values()), rank_result

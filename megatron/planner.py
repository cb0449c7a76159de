"""`--dry-run`: plan a run's memory and time per pipeline stage without allocating anything.

The model is built on the meta device with a fake `ParallelState` for each pipeline stage (tensor-parallel
ranks are symmetric, data-parallel ranks identical), so the parameter counts are the real ones.

Per GPU (one rank of the stage), in bytes:
- weights: params x 2 (bf16/fp16) or 4 (fp32); gradients: params x 4 (fp32 main grads);
- optimizer: params x 12 (fp32 master + Adam m and v), / DP with --use-distributed-optimizer (both shown);
- activations per micro-batch, our own count of what autograd saves (Korthikanti et al. 2022, adapted to
  multi-query attention). With E bytes per element (2 in 16-bit, 4 in fp32), s, b, h, a heads, d = h/a:

      per layer:  sbh * (14 E + 2) + 2 sbd * E * kv_heads + a s^2 b * (2 E + 1)
                  LN inputs 2E, LN outputs (QKV and fc1 inputs) 2E, Q E, dense input E, GELU input and
                  output 8E, two hidden-dropout masks 2 x 1 byte; K and V 2 sbd E per K/V head (one head
                  under multi-query: *not* split by TP, every rank holds it); attention probabilities E,
                  their dropout mask 1 and output E per score.
      (multi-head in 16-bit: 34 sbh + 5 a s^2 b, Megatron's figure; multi-query: (30 + 4/a) sbh + ...)

  Tensor parallelism splits the attention/MLP interior (Q, dense input, GELU, scores) by t; with sequence
  parallelism the LayerNorm/dropout part (LN inputs/outputs, hidden masks: 4E + 2 per sbh) too, otherwise
  it stays whole (the column-parallel GEMMs keep the sequence chunk of their input, the LN output, and
  gather it again in backward; tests/distributed/test_tensor_parallel.py counts it). Without dropout its masks (and the attention-dropout output) are not stored. Selective
  recomputation, and flash attention in 16-bit (the StarCoder setting), drop the s^2 terms. Full
  recomputation keeps only each layer's input (sbh E, / t under sequence parallelism) plus one layer's
  full set (the working set of the layer being recomputed). The first stage adds the embedding's dropout
  mask (sbh); the last the final LayerNorm input and output (2 sbh E: the loss keeps the output, both / t
  under sequence parallelism) and the fp32 logits of the loss (s b V / t x 4).
- in flight: 1F1B keeps min(PP, micro-batches) micro-batches of activations on the first stage (each
  stage's figure uses min(PP - stage, micro-batches)); the interleaved schedule with v chunks per stage
  keeps min(2 (PP - stage - 1) + (v - 1) PP + 1, v x micro-batches) chunk forwards, each 1/v of the
  stage's layers: (1 + (PP - 1) / (PP v)) x PP micro-batches' worth on the first stage, Megatron's factor.
- fits: total <= 90% of the device's memory (the 10% margin covers the CUDA context, NCCL buffers,
  allocator fragmentation and temporaries such as gradient-reduction buckets).

Time: FLOPs per iteration = flops_per_token x global batch x seq (`megatron.model.flops`); iteration time
= that / (world size x MFU x peak bf16 dense FLOP/s of the named GPU, `megatron.config.gpus`); days =
iterations (`Config.num_train_iters`, as the run computes them) x time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from megatron.config.gpus import PLANNER_GPU_MEMORY, gpu_peak_flops

MEMORY_MARGIN = 0.9  # usable fraction of the device memory

GB = 1e9


@dataclass
class StagePlan:
    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    optimizer_distributed: int
    activations_per_micro_batch: int
    in_flight: float  # micro-batches of this stage's activations held at the peak (fractional: interleaved)
    # bytes one GPU of the stage sends per step to synchronise gradients and parameters, per (group kind,
    # collective): `_sync_bytes`
    sync_bytes: dict[tuple[str, str], Fraction] = field(default_factory=dict)
    # bytes one GPU of the stage sends per step to its pipeline neighbours (`pipeline.send_bytes`)
    pipeline_send_bytes: int = 0

    @property
    def activations(self) -> int:
        return round(self.activations_per_micro_batch * self.in_flight)

    def total(self, distributed_optimizer: bool) -> int:
        opt = self.optimizer_distributed if distributed_optimizer else self.optimizer
        return self.weights + self.grads + opt + self.activations


def _in_flight(pp: int, stage: int, micro_batches: int, vpp: int | None) -> float:
    """Micro-batches of a stage's activations alive at its peak under the schedule `forward_backward`
    runs: 1F1B runs pp - stage - 1 warm-up forwards, and holds one more before its first backward; the
    interleaved schedule holds warm-up + 1 chunk forwards, each 1/vpp of the stage's layers."""
    if pp == 1:
        return 1
    from megatron.parallel.pipeline import in_flight_limit

    return in_flight_limit(pp, stage, micro_batches, vpp or 1) / (vpp or 1)


def _fake_state(tp: int, pp: int, stage: int, dp: int, sequence_parallel: bool):
    from megatron.parallel.collectives import Group
    from megatron.parallel.state import ParallelState

    return ParallelState(
        device=torch.device("meta"),
        world_size=tp * pp * dp,
        rank=stage * dp * tp,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_rank=stage,
        data_parallel_size=dp,
        sequence_parallel=bool(sequence_parallel and tp > 1),
        tp_group=Group(tuple(range(tp)), 0, None),
    )


def _full_numel(param) -> int:
    shape = getattr(param, "full_shape", None)
    if shape is None:
        return param.numel()
    n = 1
    for size in shape:
        n *= size
    return n


def layer_activation_bytes(model_cfg, *, b: int, tp: int, sp: bool, element: int, recompute, flash) -> int:
    """Bytes one decoder layer saves for backward for one micro-batch on one TP rank (see the docstring)."""
    s, h, a = model_cfg.seq_length, model_cfg.hidden_size, model_cfg.num_attention_heads
    d = model_cfg.kv_channels or h // a
    kv_heads = 1 if model_cfg.attention_head_type == "multiquery" else a
    sbh = s * b * h
    hidden_masks = 2 if model_cfg.hidden_dropout > 0 else 0
    outside = sbh * (4 * element + hidden_masks)  # LN inputs/outputs and hidden-dropout masks
    inside = sbh * (2 * element + 8 * element)  # Q, dense input, GELU input and output
    kv = 2 * s * b * d * element * kv_heads
    if kv_heads > 1:
        kv //= tp  # multi-head K/V split with the heads; the single multi-query head is replicated
    per_score = element + ((element + 1) if model_cfg.attention_dropout > 0 else 0)
    scores = 0 if (recompute == "selective" or flash) else a * s * s * b * per_score // tp
    full = (outside // tp if sp else outside) + inside // tp + kv + scores
    if recompute == "full":
        return sbh * element // (tp if sp else 1)
    return full


def all_stage_layers(model_cfg, parallel_cfg, pp: int) -> list[list[int]]:
    """The global layer indices each pipeline stage holds (all its virtual chunks)."""
    from megatron.config.parallel import pipeline_layer_ranges

    layout = parallel_cfg.pipeline_layout
    return [
        [
            i
            for start, end in pipeline_layer_ranges(model_cfg.num_layers, pp, stage, **layout)
            for i in range(start, end)
        ]
        for stage in range(pp)
    ]


@dataclass(frozen=True)
class _Layout:
    """What the estimates read from the config, derived once."""

    tp: int
    pp: int
    dp: int
    sp: bool  # sequence parallelism in effect (needs TP > 1)
    micro_batch_size: int
    element: int  # bytes per activation element
    flash: bool  # flash attention in effect (16-bit only)
    recompute: str | None
    micro_batches: int
    vpp: int | None  # model chunks per stage (interleaved schedule)


def _layout(cfg) -> _Layout:
    m, par, train = cfg.model, cfg.parallel, cfg.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    element = 4 if train.precision == "fp32" else 2
    vpp = None
    if par.num_layers_per_virtual_pipeline_stage:
        vpp = m.num_layers // (pp * par.num_layers_per_virtual_pipeline_stage)
    return _Layout(
        tp=tp,
        pp=pp,
        dp=cfg.data_parallel_size,
        sp=bool(par.sequence_parallel and tp > 1),
        micro_batch_size=train.micro_batch_size,
        element=element,
        flash=m.use_flash_attn and element == 2,
        recompute=m.recompute_granularity,
        micro_batches=cfg.num_micro_batches,
        vpp=vpp,
    )


def _layer_bytes(model_cfg, layout: _Layout, *, sp: bool, recompute) -> int:
    return layer_activation_bytes(
        model_cfg,
        b=layout.micro_batch_size,
        tp=layout.tp,
        sp=sp,
        element=layout.element,
        recompute=recompute,
        flash=layout.flash,
    )


def _stage_activation_bytes(model_cfg, layout: _Layout, stage: int, num_layers: int) -> int:
    """Bytes one micro-batch leaves saved for backward on `stage` (holding `num_layers` layers)."""
    m, tp, sp = model_cfg, layout.tp, layout.sp
    sbh = m.seq_length * layout.micro_batch_size * m.hidden_size
    act = _layer_bytes(m, layout, sp=sp, recompute=layout.recompute) * num_layers
    if layout.recompute == "full" and num_layers:
        act += _layer_bytes(m, layout, sp=sp, recompute=None)  # the layer being recomputed
    if stage == 0 and m.hidden_dropout > 0:
        act += sbh // (tp if sp else 1)  # the embedding's dropout mask
    if stage == layout.pp - 1:  # the final LayerNorm input and output (the loss's), the fp32 logits
        act += 2 * sbh * layout.element // (tp if sp else 1)
        act += m.seq_length * layout.micro_batch_size * m.vocab_size * 4 // tp
    return act


def _stage_plan(cfg, layout: _Layout, stage: int) -> tuple[StagePlan, int]:
    """The stage's plan and its logical parameter count (a pipeline-duplicated tied embedding counted
    on one stage only), from its model built on the meta device."""
    from megatron.model import build_model

    m = cfg.model
    state = _fake_state(layout.tp, layout.pp, stage, layout.dp, layout.sp)
    model = build_model(m, m.vocab_size, state, cfg.parallel, device="meta")
    params = sum(p.numel() for p in model.parameters())
    logical = sum(_full_numel(p) for p in model.parameters() if not getattr(p, "pipeline_duplicate", False))
    stage_plan = StagePlan(
        stage=stage,
        params=params,
        weights=params * layout.element,
        grads=params * 4,
        optimizer=params * 12,
        optimizer_distributed=-(-params * 12 // layout.dp),
        activations_per_micro_batch=_stage_activation_bytes(m, layout, stage, len(model.layers)),
        in_flight=_in_flight(layout.pp, stage, layout.micro_batches, layout.vpp),
        sync_bytes=_sync_bytes(cfg, layout, model),
        pipeline_send_bytes=_pipeline_send_bytes(m, layout, stage),
    )
    return stage_plan, logical


def _pipeline_send_bytes(model_cfg, layout: _Layout, stage: int) -> int:
    """The stage's pipeline messages per step: one [b, s(/t), h] tensor in the model dtype each."""
    from megatron.parallel.pipeline import send_bytes

    seq = model_cfg.seq_length // (layout.tp if layout.sp else 1)
    message = layout.micro_batch_size * seq * model_cfg.hidden_size * layout.element
    return send_bytes(layout.pp, stage, layout.micro_batches, layout.vpp or 1, message)


def _sync_bytes(cfg, layout: _Layout, model) -> dict[tuple[str, str], Fraction]:
    """Bytes one GPU of this stage (DP rank 0, the busiest) sends per step to synchronise gradients and
    parameters, per (group kind, collective): the gradient buckets of `parallel/data_parallel.py` laid
    out as training lays them out (padding included) and priced with `collectives.wire_bytes`, the
    formulas the byte counter uses. With the distributed optimizer: a reduce-scatter of every bucket's
    fp32 gradients and an all-gather of its parameters (model dtype) over DP; without: an fp32 all-reduce
    over DP. Then the TP sum of the `tp_grad_reduce` gradients (the owned part under the distributed
    optimizer) and, on the first and last stage under pipeline parallelism, the tied embedding's sum."""
    from megatron.parallel.data_parallel import bucket_layout, default_bucket_size, sync_wire_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    bucket_size = cfg.parallel.ddp_bucket_size or default_bucket_size(layout.dp)
    tied = any(getattr(p, "embedding_group_reduce", False) for p in params)
    return sync_wire_bytes(
        bucket_layout(list(reversed(params)), bucket_size, layout.dp),
        data_parallel_size=layout.dp,
        tensor_parallel_size=layout.tp,
        embedding_group_size=2 if tied else 1,
        distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        param_element_size=layout.element,
    )


def format_sync_bytes(sync_bytes: dict[tuple[str, str], Fraction]) -> str:
    """`{(kind, op): bytes}` as "dp 1.23 GB (reduce_scatter 0.82 GB + all_gather 0.41 GB), tp ..."."""
    kinds: dict[str, list[tuple[str, Fraction]]] = {}
    for (kind, op), value in sorted(sync_bytes.items()):
        kinds.setdefault(kind, []).append((op, value))
    parts = []
    for kind, ops in kinds.items():
        total = sum(value for _, value in ops)
        detail = " + ".join(f"{op.replace('_', '-')} {float(value) / GB:.3f} GB" for op, value in ops)
        parts.append(f"{kind} {float(total) / GB:.3f} GB ({detail})")
    return ", ".join(parts) or "none (one data-parallel replica, no tensor or pipeline sharing)"


def _bubble(layout: _Layout) -> float:
    """Idle fraction of the pipeline schedule (each of the vpp chunks shortens the fill and drain)."""
    return (layout.pp - 1) / ((layout.vpp or 1) * layout.micro_batches + layout.pp - 1)


def _activation_alternatives(cfg, layout: _Layout) -> dict:
    """Decoder-layer activations of stage 0 per micro-batch, for each (sequence parallel, recompute)."""
    m = cfg.model
    layers_first = len(all_stage_layers(m, cfg.parallel, layout.pp)[0]) if layout.pp > 1 else m.num_layers
    return {
        (sp_option, option): layers_first * _layer_bytes(m, layout, sp=sp_option, recompute=option)
        for sp_option in ((False, True) if layout.tp > 1 else (False,))
        for option in (None, "selective", "full")
    }


def _time(cfg, layout: _Layout, peak: float, mfu: float) -> dict:
    """FLOPs and seconds per iteration, and the run's iterations, tokens and days."""
    from megatron.model.flops import flops_per_token

    m = cfg.model
    world = layout.tp * layout.pp * layout.dp
    tokens_per_iter = cfg.training.global_batch_size * m.seq_length
    flops_iter = flops_per_token(m, m.vocab_size) * tokens_per_iter
    iter_seconds = flops_iter / (world * mfu * peak)
    iterations = cfg.num_train_iters
    return {
        "flops_per_iteration": flops_iter,
        "iteration_seconds": iter_seconds,
        "iterations": iterations,
        "tokens": iterations * tokens_per_iter,
        "days": iterations * iter_seconds / 86400,
    }


# The vocabulary a dry run plans when neither --vocab-size nor a tokenizer is given: the StarCoder
# tokenizer's (the BigCode presets' own), stated in the plan.
ASSUMED_VOCAB_SIZE = 49152


def planned_vocab_size(cfg) -> tuple[int, str]:
    """(vocabulary size, where it came from) for a plan: --vocab-size; else the tokenizer named by the
    flags, read and padded as training pads it (ValueError when it cannot be read); else
    ASSUMED_VOCAB_SIZE padded likewise."""
    from megatron.config import check_vocab_size

    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "--vocab-size"
    data = cfg.data
    if data.tokenizer_file or data.vocab_file or data.tokenizer_model:
        from megatron.training.vocab import checked_tokenizer

        try:
            tokenizer, vocab_size = checked_tokenizer(cfg)
        except OSError as error:
            raise ValueError(f"--dry-run: cannot read the tokenizer: {error}") from None
        return vocab_size, f"the tokenizer's {tokenizer.vocab_size:,} tokens, padded"
    vocab_size = check_vocab_size(cfg, ASSUMED_VOCAB_SIZE)
    return vocab_size, (
        f"assumed: the StarCoder tokenizer's {ASSUMED_VOCAB_SIZE:,} tokens, padded; give --vocab-size N or "
        "--tokenizer-file FILE to plan yours"
    )


def layout_origin(cfg) -> str:
    """Where the plan's data-parallel size came from, and how to plan another (`Config.world_size_origin`)."""
    par, dp = cfg.parallel, cfg.data_parallel_size
    world = (
        f"world size {cfg.world_size} = TP {par.tensor_model_parallel_size} x PP "
        f"{par.pipeline_model_parallel_size} x DP {dp}"
    )
    if cfg.world_size_origin == "assumed":
        return (
            f"{world}, assumed: the smallest data-parallel size (WORLD_SIZE is not set and the config gives "
            "no --data-parallel-size); plan your launch with --data-parallel-size N or WORLD_SIZE=N"
        )
    if cfg.world_size_origin == "--data-parallel-size":
        return f"{world}, from --data-parallel-size {dp} (WORLD_SIZE is not set)"
    return f"{world}, from {cfg.world_size_origin}" if cfg.world_size_origin == "WORLD_SIZE" else world


def plan(cfg, gpu: str = "A100", mfu: float = 0.4) -> dict:
    """The plan as a dict: per-stage `StagePlan`s plus batch, bubble, FLOPs, time and fit fields.

    The vocabulary is `planned_vocab_size`'s (cfg.model.vocab_size is set to it); the per-GPU peak is
    --peak-tflops when given, else `gpu`'s bf16 datasheet peak."""
    vocab_size, vocab_origin = planned_vocab_size(cfg)
    cfg.model.vocab_size = vocab_size
    peak_tflops = cfg.training.peak_tflops
    peak = peak_tflops * 1e12 if peak_tflops else gpu_peak_flops(gpu, "bf16")
    layout = _layout(cfg)
    planned = [_stage_plan(cfg, layout, stage) for stage in range(layout.pp)]
    stages = [stage_plan for stage_plan, _ in planned]
    memory = PLANNER_GPU_MEMORY[gpu]
    distributed = bool(cfg.parallel.use_distributed_optimizer)
    worst = max(st.total(distributed) for st in stages)
    return {
        "activation_alternatives": _activation_alternatives(cfg, layout),
        "stages": stages,
        "params": sum(logical for _, logical in planned),
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
        "sequence_parallel": layout.sp,
        "recompute": layout.recompute,
        "flash": layout.flash,
        "micro_batches": layout.micro_batches,
        "bubble": _bubble(layout),
        **_time(cfg, layout, peak, mfu),
        "gpu": gpu,
        "peak_tflops": peak / 1e12,
        "peak_origin": "--peak-tflops" if peak_tflops else f"{gpu} bf16 dense peak",
        "layout_origin": layout_origin(cfg),
        "vocab_size": vocab_size,
        "vocab_origin": vocab_origin,
        "mfu": mfu,
        "device_memory": memory,
        "usable_memory": memory * MEMORY_MARGIN,
        "distributed_optimizer": distributed,
        "peak_per_gpu": worst,
        "fits": worst <= memory * MEMORY_MARGIN,
    }


def format_plan(p: dict) -> str:
    """The plan as printed by `--dry-run`."""
    lines = [
        f"dry run: {p['params']:,} parameters; TP {p['tp']} x PP {p['pp']} x DP {p['dp']}"
        f" (sequence parallel {'on' if p['sequence_parallel'] else 'off'}, recompute {p['recompute'] or 'none'},"
        f" flash attention {'on' if p['flash'] else 'off'}), {p['micro_batches']} micro-batches per step",
        f"  {p['layout_origin']}",
        f"  vocabulary {p['vocab_size']:,} ({p['vocab_origin']})",
    ]
    for st in p["stages"]:
        lines.append(
            f"  stage {st.stage}: {st.params:,} params per GPU; weights {st.weights / GB:.2f} GB, grads "
            f"{st.grads / GB:.2f} GB, optimizer {st.optimizer / GB:.2f} GB ({st.optimizer_distributed / GB:.2f} GB "
            f"distributed), activations {st.activations_per_micro_batch / GB:.2f} GB per micro-batch x "
            f"{st.in_flight:g} in flight; total {st.total(False) / GB:.2f} GB "
            f"({st.total(True) / GB:.2f} GB with the distributed optimizer)"
        )
    lines.append(
        f"  pipeline bubble {100 * p['bubble']:.1f}%; {p['flops_per_iteration']:.3e} FLOPs per iteration; "
        f"{p['iteration_seconds']:.2f} s per iteration at {100 * p['mfu']:.0f}% MFU of "
        f"{p['peak_tflops']:g} TFLOP/s per GPU ({p['peak_origin']}); "
        f"{p['iterations']:,} iterations ({p['tokens']:.3e} tokens) in {p['days']:.1f} days"
    )
    for st in p["stages"]:
        lines.append(
            f"  stage {st.stage}: gradient/parameter sync per step, bytes sent per GPU by group: "
            f"{format_sync_bytes(st.sync_bytes)}"
        )
    if p["pp"] > 1:
        sends = ", ".join(f"stage {st.stage} {st.pipeline_send_bytes / GB:.3f} GB" for st in p["stages"])
        lines.append(f"  pipeline point-to-point per step, bytes sent per GPU (pp group): {sends}")
    options = "; ".join(
        f"{'SP' if sp_option else 'no SP'} + {option or 'no'} recompute {value / GB:.2f} GB"
        for (sp_option, option), value in p["activation_alternatives"].items()
    )
    lines.append(f"  decoder-layer activations per micro-batch on stage 0 by setting: {options}")
    verdict = "fits" if p["fits"] else "does not fit"
    lines.append(
        f"  peak per GPU {p['peak_per_gpu'] / GB:.2f} GB "
        f"({'with' if p['distributed_optimizer'] else 'without'} the distributed optimizer): {verdict} in "
        f"{p['gpu']} {p['device_memory'] / GB:.0f} GB (usable {p['usable_memory'] / GB:.0f} GB at a "
        f"{100 * (1 - MEMORY_MARGIN):.0f}% margin)"
    )
    return "\n".join(lines)

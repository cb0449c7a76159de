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
  it stays whole. Without dropout its masks (and the attention-dropout output) are not stored. Selective
  recomputation, and flash attention in 16-bit (the StarCoder setting), drop the s^2 terms. Full
  recomputation keeps only each layer's input (sbh E, / t under sequence parallelism) plus one layer's
  full set (the working set of the layer being recomputed). The first stage adds the embedding's dropout
  mask (sbh); the last the final LayerNorm input (sbh E) and the fp32 logits of the loss (s b V / t x 4).
- in flight: 1F1B keeps min(PP, micro-batches) micro-batches of activations on the first stage (each
  stage's figure uses min(PP - stage, micro-batches)); the interleaved schedule with v chunks per stage
  keeps min(2 (PP - stage - 1) + (v - 1) PP + 1, v x micro-batches) chunk forwards, each 1/v of the
  stage's layers: (1 + (PP - 1) / (PP v)) x PP micro-batches' worth on the first stage, Megatron's factor.
- fits: total <= 90% of the device's memory (the 10% margin covers the CUDA context, NCCL buffers,
  allocator fragmentation and temporaries such as gradient-reduction buckets).

Time: FLOPs per iteration = flops_per_token x global batch x seq (`megatron.model.flops`); iteration time
= that / (world size x MFU x peak bf16 dense FLOP/s of the named GPU); days = iterations x time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPUS = {  # name: (peak dense bf16 FLOP/s, memory bytes)
    "A100": (312e12, 80e9),
    "H100": (989e12, 80e9),
    "H200": (989e12, 141e9),
}
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


def plan(cfg, gpu: str = "A100", mfu: float = 0.4) -> dict:
    """The plan as a dict: per-stage `StagePlan`s plus batch, bubble, FLOPs, time and fit fields."""
    from megatron.model.flops import flops_per_token
    from megatron.model.gpt import GPTModel

    m, par, train = cfg.model, cfg.parallel, cfg.training
    if m.vocab_size is None:
        raise ValueError("--dry-run needs --vocab-size (no tokenizer is loaded)")
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = cfg.data_parallel_size
    sp = bool(par.sequence_parallel and tp > 1)
    b, s, h = train.micro_batch_size, m.seq_length, m.hidden_size
    element = 4 if train.precision == "fp32" else 2
    flash = bool(getattr(m, "use_flash_attn", False)) and element == 2
    recompute = m.recompute_granularity
    micro_batches = train.global_batch_size // (b * dp)
    vpp = None
    if par.num_layers_per_virtual_pipeline_stage:
        vpp = m.num_layers // (pp * par.num_layers_per_virtual_pipeline_stage)

    stages = []
    total_params = 0
    for stage in range(pp):
        state = _fake_state(tp, pp, stage, dp, sp)
        model = GPTModel(m, m.vocab_size, state, device="meta", parallel_config=par)
        params = sum(p.numel() for p in model.parameters())
        # logical parameters (a pipeline-duplicated tied embedding counted once)
        total_params += sum(
            _full_numel(p) for p in model.parameters() if not getattr(p, "pipeline_duplicate", False)
        )
        layers_here = len(model.layers)
        per_layer = layer_activation_bytes(
            m, b=b, tp=tp, sp=sp, element=element, recompute=recompute, flash=flash
        )
        act = per_layer * layers_here
        if recompute == "full" and layers_here:
            act += layer_activation_bytes(m, b=b, tp=tp, sp=sp, element=element, recompute=None, flash=flash)
        if stage == 0 and m.hidden_dropout > 0:
            act += s * b * h // (tp if sp else 1)
        if stage == pp - 1:
            act += s * b * h * element // (tp if sp else 1) + s * b * m.vocab_size * 4 // tp
        stages.append(
            StagePlan(
                stage=stage,
                params=params,
                weights=params * element,
                grads=params * 4,
                optimizer=params * 12,
                optimizer_distributed=-(-params * 12 // dp),
                activations_per_micro_batch=act,
                in_flight=_in_flight(pp, stage, micro_batches, vpp),
            )
        )
    peak, memory = GPUS[gpu]
    world = tp * pp * dp
    tokens_per_iter = train.global_batch_size * s
    flops_iter = flops_per_token(m, m.vocab_size) * tokens_per_iter
    iter_seconds = flops_iter / (world * mfu * peak)
    iterations = train.train_iters
    if iterations is None:
        iterations = -(-train.train_samples // train.global_batch_size)
    if vpp:
        bubble = (pp - 1) / (vpp * micro_batches + pp - 1)
    else:
        bubble = (pp - 1) / (micro_batches + pp - 1)
    distributed = bool(par.use_distributed_optimizer)
    worst = max(st.total(distributed) for st in stages)
    layers_first = len(all_stage_layers(m, par, pp)[0]) if pp > 1 else m.num_layers
    alternatives = {  # decoder-layer activations of stage 0 per micro-batch, for each setting
        (sp_option, option): layers_first
        * layer_activation_bytes(m, b=b, tp=tp, sp=sp_option, element=element, recompute=option, flash=flash)
        for sp_option in ((False, True) if tp > 1 else (False,))
        for option in (None, "selective", "full")
    }
    return {
        "activation_alternatives": alternatives,
        "stages": stages,
        "params": total_params,
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "sequence_parallel": sp,
        "recompute": recompute,
        "flash": flash,
        "micro_batches": micro_batches,
        "bubble": bubble,
        "flops_per_iteration": flops_iter,
        "iteration_seconds": iter_seconds,
        "iterations": iterations,
        "tokens": iterations * tokens_per_iter,
        "days": iterations * iter_seconds / 86400,
        "gpu": gpu,
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
        f"{p['iteration_seconds']:.2f} s per iteration at {100 * p['mfu']:.0f}% MFU on {p['gpu']}; "
        f"{p['iterations']:,} iterations ({p['tokens']:.3e} tokens) in {p['days']:.1f} days"
    )
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

"""The output layer fused with the per-token cross-entropy: one implementation for every layout.

`linear_cross_entropy(hidden, weight, labels, group)` equals
`F.cross_entropy((hidden @ full_weight.T).float(), labels, reduction="none")`, where `weight` is this rank's
vocabulary shard of `full_weight` (rows [rank * V / tp, (rank + 1) * V / tp) of the tensor-parallel
`group`). At tensor-parallel size 1 the group is trivial, `weight` is the whole [V, h] matrix and the two
all-reduces below return their input: the one-process loss is this code with nothing exchanged.

Memory: it holds a single fp32 [N, V / tp] buffer. The logits are turned into exp(logit - max) in place,
kept for backward and turned into the logit gradient in place there: four passes over the buffer in place
of log_softmax + nll_loss and their backwards (which also allocate and zero-fill two more [N, V] tensors).
The full vocabulary is never gathered. (Passes over row blocks that fit in L2 were slower with 2 threads
under CPU contention: many small ops, each a thread rendezvous.)

Communication (tp > 1): two all-reduces of [N] vectors in forward: the max logit (max), then the target
logit (held by one rank, zeros elsewhere) together with the sum of exp(logit - max) (sum) in one call. The
per-token loss, log(sum_exp) + max - target, is then the same bits on every rank. The logit gradient
softmax - onehot is local to each shard and each rank's weight gradient is complete for its rows; the
hidden gradient is this shard's partial sum, summed over the group as `input_mapping` says:
- "none": by the caller (the function returns the partial sum);
- "copy": `hidden` [N, h] is whole on every rank; backward all-reduces its gradient in place (it is the
  GEMM's own output: no copy, and the all-reduce overlaps the weight-gradient GEMM);
- "gather": `hidden` is this rank's sequence chunk [b, s / tp, h] (sequence parallelism), all-gathered to
  [b * s, h] for the logits. Only the chunk is kept for backward, which gathers it again while computing
  the hidden gradient, then reduce-scatters that gradient to the chunk while computing the weight
  gradient (as `megatron.parallel.layers.column_parallel_linear`).

The logits and hidden-gradient GEMMs go through `kernels.matmul_nt` (oneDNN for fp32 on the CPU).
"""

from __future__ import annotations

import torch

from megatron import kernels
from megatron.parallel import collectives, mappings
from megatron.parallel.collectives import TRIVIAL, Group

INPUT_MAPPINGS = ("none", "copy", "gather")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, input_mapping):
        ctx.group, ctx.sequence_parallel = group, input_mapping == "gather"
        ctx.reduce_hidden_grad = input_mapping != "none"
        whole = mappings.start_input_gather(hidden, group, ctx.sequence_parallel).wait()
        whole = whole.reshape(-1, whole.shape[-1])  # [N, h]
        logits = kernels.matmul_nt(whole, weight)  # [N, V/tp] in the model (or autocast) dtype
        ctx.compute_dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax and the saved buffer are fp32
        local_labels = labels - group.rank * weight.shape[0]
        here = (local_labels >= 0) & (local_labels < weight.shape[0])  # [N]: this rank holds the label
        local_labels = local_labels.masked_fill(~here, 0)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = logits[rows, local_labels].masked_fill_(~here, 0.0)  # [N]
        max_logit = collectives.all_reduce(logits.amax(dim=1), group, op="max")  # [N]
        sum_exp = logits.sub_(max_logit[:, None]).exp_().sum(dim=1)  # exp(logit - max) in place; [N]
        if not group.is_trivial:
            totals = collectives.all_reduce(torch.stack([target, sum_exp]), group)  # [2, N]
            target, sum_exp = totals[0], totals[1]
        loss = sum_exp.log().add_(max_logit).sub_(target)
        ctx.save_for_backward(hidden, weight, local_labels, here, logits, sum_exp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "linear_cross_entropy supports one backward pass (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        hidden, weight, local_labels, here, exp_logits, sum_exp = ctx.saved_tensors
        gathering = mappings.start_input_gather(hidden, ctx.group, ctx.sequence_parallel)
        # d loss_i / d logit_ij = softmax_ij - [j == label_i]; the saved buffer becomes the gradient
        grad_logits = exp_logits
        grad_loss = grad_loss.to(sum_exp.dtype)
        grad_logits.mul_((grad_loss / sum_exp)[:, None])  # softmax * grad_loss
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        onehot = torch.where(here, -grad_loss, torch.zeros_like(grad_loss))  # labels other ranks hold: 0
        grad_logits.index_put_((rows, local_labels), onehot, accumulate=True)
        dtype = ctx.compute_dtype  # the forward matmul's dtype (bf16 under autocast), not fp32
        grad_logits = grad_logits.to(dtype)
        grad_hidden = grad_weight = reducing = None
        if ctx.needs_input_grad[0]:  # this shard's share of grad @ W, while the input is gathered
            grad_hidden = kernels.matmul_nt(grad_logits, weight.to(dtype).t()).to(hidden.dtype)  # [N, h]
            if ctx.reduce_hidden_grad:  # summed over TP while the weight gradient is computed
                shape = (
                    (hidden.shape[0], -1, hidden.shape[-1]) if ctx.sequence_parallel else grad_hidden.shape
                )
                reducing = mappings.start_input_grad_reduction(
                    grad_hidden.view(shape), ctx.group, ctx.sequence_parallel
                )
        whole = gathering.wait()
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ whole.reshape(-1, whole.shape[-1]).to(dtype)).to(weight.dtype)
        if reducing is not None:
            grad_hidden = reducing.wait()
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: Group = TRIVIAL,
    input_mapping: str = "none",
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the logits `hidden @ full_weight.T` against `labels`.

    hidden [N, h] (model dtype; identical on every rank of `group`), or with `input_mapping="gather"` this
    rank's sequence chunk [b, s / tp, h] of the [b, s, h] whose rows are the N = b * s tokens; weight
    [V / tp, h] (this rank's vocabulary rows; the whole [V, h] at tp 1), labels int64 [N] in [0, V) ->
    loss float32 [N], identical on every rank. `input_mapping` ("none", "copy", "gather"): who sums the
    hidden gradient over the group (module docstring). Backward may run once (the saved buffer is
    overwritten by it).
    """
    assert input_mapping in INPUT_MAPPINGS, input_mapping
    return _LinearCrossEntropy.apply(hidden, weight, labels, group, input_mapping)

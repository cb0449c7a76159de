"""Output layer fused with the per-token cross-entropy.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none")` but holds a single fp32 [N, V]
buffer: the logits are turned into exp(logit - max) in place, kept for backward and turned into the
logit gradient in place there: four passes over [N, V] in place of log_softmax + nll_loss and their
backwards (which also allocate and zero-fill two more [N, V] tensors). (Passes over row blocks that fit
in L2 were slower with 2 threads under CPU contention: many small ops, each a thread rendezvous.)
The logits and hidden-gradient GEMMs go through `layers.matmul_nt` (oneDNN for fp32 on the CPU).
The vocabulary-parallel version (logits split over TP ranks) comes with the tensor-parallel issue.
"""

from __future__ import annotations

import torch

from megatron.model import layers


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels):
        logits = layers.matmul_nt(hidden, weight)  # [N, V] in the model (or autocast) dtype
        ctx.compute_dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax and the saved buffer are fp32
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = logits[rows, labels]  # [N]
        max_logit = logits.amax(dim=1)  # [N]
        sum_exp = logits.sub_(max_logit[:, None]).exp_().sum(dim=1)  # exp(logit - max) in place; [N]
        loss = sum_exp.log().add_(max_logit).sub_(target)
        ctx.save_for_backward(hidden, weight, labels, logits, sum_exp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "linear_cross_entropy supports one backward pass (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        hidden, weight, labels, exp_logits, sum_exp = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == label_i]; the saved buffer becomes the gradient
        grad_logits = exp_logits
        grad_loss = grad_loss.to(sum_exp.dtype)
        grad_logits.mul_((grad_loss / sum_exp)[:, None])  # softmax * grad_loss
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits.index_put_((rows, labels), -grad_loss, accumulate=True)
        dtype = ctx.compute_dtype  # the forward matmul's dtype (bf16 under autocast), not fp32
        grad_logits = grad_logits.to(dtype)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = layers.matmul_nt(grad_logits, weight.to(dtype).t()).to(hidden.dtype)  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ hidden.to(dtype)).to(weight.dtype)
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the logits `hidden @ weight.T` against `labels`.

    hidden [N, h] (model dtype), weight [V, h], labels int64 [N] in [0, V) -> loss float32 [N].
    Backward may run once (the saved buffer is overwritten by it).
    """
    return _LinearCrossEntropy.apply(hidden, weight, labels)

"""Pipeline parallelism: the schedules that run this rank's model chunks over the micro-batches of a step,
and the point-to-point messages between stages. (Without pipelining, training/step.py runs the
micro-batches itself; it calls `run_schedule` when the pipeline-parallel size is above 1.)

Layout. Pipeline rank r of P holds `model.num_chunks` chunks (V, virtual stages); virtual stage v * P + r
is rank r's chunk v (Megatron's order), so without interleaving (V = 1) rank r is stage r, and with it
the activations go round the ring of ranks V times: rank P - 1's chunk v feeds rank 0's chunk v + 1.
`model.forward_chunk(c, tokens=... | hidden=..., labels=...)` runs one chunk (`megatron.model.stage`):
rank 0's chunk 0 embeds the tokens, rank P - 1's last chunk returns the per-token loss, every other chunk
maps hidden states to hidden states.

Schedules (m micro-batches):
- 1F1B (V = 1): rank r runs min(P - r - 1, m) warm-up forwards, then alternates one forward and one
  backward (steady state), then runs the remaining backwards (cool-down). At most P - r micro-batches
  are in flight on rank r (activations held for their backward), against m when all forwards run first.
  Idle ("bubble") fraction of a step with equal stages: (P - 1) / (m + P - 1).
- interleaved 1F1B (V > 1): Megatron's schedule. Forwards run in groups of P micro-batches through
  chunk 0, the same P through chunk 1, ..., then the next P; backwards likewise from the last chunk
  down. Warm-up (P - r - 1) * 2 + (V - 1) * P forwards (every forward when m == P), then 1F1B, then
  cool-down. Needs m % P == 0. Bubble (P - 1) / (V * m + P - 1), for V times as many messages.

Point to point. Every message has one known shape, `model.pipeline_hidden_shape(b, s)` ([b, s, h], or
[b, s / tp, h] under sequence parallelism), in the model's dtype: the receiver allocates its buffer
before the data arrives and nothing else is exchanged. The sends and receives of one schedule step are
posted together (`torch.distributed.batch_isend_irecv`), then all waited for: a stage that sends forward
and receives backward in one step cannot deadlock with its neighbour doing the converse, as two blocking
calls in sequence would (gloo's send waits for the matching receive to be posted). Activations travel
with tag 0 and gradients with tag 1, and a step posts its operations in one fixed order (send next,
receive previous, send previous, receive next): with P = 2, where the next and the previous rank are the
same, the two directions cannot be confused, with tags (gloo) or by order (NCCL ignores tags).

Gradients. The last chunk's backward starts from the micro-batch's loss sum / loss tokens of the global
batch (training/step.py defines the loss), multiplied by the fp16 loss scale in `optimizer.backward`;
every other chunk backpropagates the gradient received from the next virtual stage (already scaled)
through its output and sends its input's gradient back. `last_micro_batch` is True exactly for the last
backward of each chunk, so with --overlap-grad-reduce a chunk's data-parallel bucket reductions start as
soon as that chunk is done.

Failure. The schedule runs under `error_store.run_guarded`: a rank that fails records why in the process
group's store, and a rank whose p2p operation then fails raises `PipelineError` naming the rank that
started it, within the distributed timeout.

Trace. Pass a list as `trace` and the schedule appends ("F" or "B", micro_batch, chunk) in the order this
rank ran them; `format_trace` prints it for a log, and `in_flight_limit` is the bound on the activation
sets held that the planner uses (tests compare traces with orders written independently).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd.variable import Variable

from megatron.parallel import error_store
from megatron.parallel.collectives import COMM_TIMER, count_send
from megatron.parallel.error_store import PipelineError
from megatron.parallel.state import ParallelState

ACTIVATION_TAG = 0  # forward messages: hidden states, to the next stage
GRADIENT_TAG = 1  # backward messages: gradients of hidden states, to the previous stage
PIPELINE_INTERFACE = (
    "num_chunks",
    "chunk_is_first",
    "chunk_is_last",
    "forward_chunk",
    "pipeline_hidden_shape",
)

Trace = list[tuple[str, int, int]]
LossFunction = Callable[[torch.Tensor, dict], torch.Tensor]
__all__ = [
    "PipelineError",
    "backward_from_output",
    "backward_step",
    "check_model",
    "format_trace",
    "free_output_data",
    "in_flight_limit",
    "record",
    "run_schedule",
    "send_bytes",
]


# --------------------------------------------------------------------------- entry point
def run_schedule(
    model: torch.nn.Module,
    optimizer,
    micro_batches: list[dict],
    parallel_state: ParallelState,
    *,
    loss_fn: LossFunction,
    total_tokens: torch.Tensor,
    forward_only: bool = False,
    trace: Trace | None = None,
) -> torch.Tensor:
    """Run 1F1B (one chunk per rank) or interleaved 1F1B over `micro_batches` on this rank's pipeline
    stage; returns this rank's loss sum (fp32 scalar, zero except on the last stage).

    `loss_fn(per_token_loss, batch)` turns the last chunk's output into the micro-batch's loss sum, whose
    backward starts from `loss_sum / total_tokens`. `optimizer`: a `MixedPrecisionOptimizer` (loss
    scaling, gradient buffer) or None for plain autograd; unused when `forward_only` (the caller runs
    that under no_grad). Failures are shared through the process group's store (`error_store`).
    Call `check_model` first, before any collective of the step.
    """
    return error_store.run_guarded(
        parallel_state,
        lambda: _pipelined(
            model, optimizer, micro_batches, parallel_state, loss_fn, total_tokens, forward_only, trace
        ),
    )


def backward_step(
    optimizer, output: torch.Tensor, grad: torch.Tensor | None, *, last_micro_batch: bool
) -> None:
    """Backward of `output` (`grad`: its gradient, None for a scalar loss) through the optimizer (loss
    scaling, gradient reductions started on the last micro-batch) or plain autograd (optimizer None)."""
    if optimizer is None:
        if grad is None:
            torch.autograd.backward(output)
        else:
            backward_from_output(output, grad)
    else:
        optimizer.backward(output, grad=grad, last_micro_batch=last_micro_batch)


def free_output_data(output: torch.Tensor) -> None:
    """Drop the data of a stage output that has been sent, keeping its autograd graph: `.data` becomes a
    one-element tensor, `grad_fn` stays, and `backward_from_output` runs its backward later. Only the
    output itself is freed (what the graph saved for the backward stays), so a view, whose storage belongs
    to another tensor, and a leaf (a chunk without layers passing its input on) are left alone."""
    if output.grad_fn is not None and output._base is None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def backward_from_output(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate `grad` through `output`'s graph (accumulating into the leaves' .grad), like
    `torch.autograd.backward`, but without comparing `grad`'s shape with `output`'s: the output's data may
    have been freed by `free_output_data` (Megatron's custom_backward)."""
    Variable._execution_engine.run_backward(
        tensors=(output,),
        grad_tensors=(grad,),
        keep_graph=False,
        create_graph=False,
        inputs=(),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def check_model(model, parallel_state: ParallelState, micro_batches: list[dict]) -> None:
    """User errors before anything is sent (every rank raises the same)."""
    missing = [name for name in PIPELINE_INTERFACE if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} cannot run pipeline-parallel: it has no {', '.join(missing)} "
            "(see megatron.parallel.pipeline)"
        )
    pp = parallel_state.pipeline_model_parallel_size
    num_micro_batches = len(micro_batches)
    if model.num_chunks > 1 and num_micro_batches % pp:
        raise ValueError(
            f"the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-stage) needs the number of "
            f"micro-batches per step, {num_micro_batches} = --global-batch-size / (--micro-batch-size x "
            f"data-parallel size), to be a multiple of --pipeline-model-parallel-size {pp}"
        )
    _micro_batch_shape(micro_batches)


def _pipelined(model, optimizer, micro_batches, parallel_state, loss_fn, total_tokens, forward_only, trace):
    """Run 1F1B or interleaved 1F1B on this rank; returns the (local) loss sum."""
    b, s = _micro_batch_shape(micro_batches)
    p2p = PipelineP2P(parallel_state, model.pipeline_hidden_shape(b, s), _model_dtype(model))
    stage = _StageRunner(
        model, optimizer, micro_batches, loss_fn, total_tokens, forward_only=forward_only, trace=trace
    )
    if model.num_chunks == 1:
        _run_1f1b(stage, p2p, len(micro_batches), forward_only)
    else:
        _Interleaved(stage, p2p, len(micro_batches), model.num_chunks, forward_only).run()
    return stage.loss_sum


def _micro_batch_shape(micro_batches: list[dict]) -> tuple[int, int]:
    shapes = sorted({tuple(batch["loss_mask"].shape) for batch in micro_batches})
    if len(shapes) != 1:
        raise ValueError(
            f"pipeline parallelism needs micro-batches of one shape (the stages exchange fixed-shape "
            f"hidden states); got [batch, sequence] shapes {shapes}"
        )
    return shapes[0]


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def record(trace: Trace | None, kind: str, micro_batch: int, chunk: int) -> None:
    """Append (kind, micro_batch, chunk) to `trace` unless it is None."""
    if trace is not None:
        trace.append((kind, micro_batch, chunk))


# --------------------------------------------------------------------------- one rank's chunks
class _StageRunner:
    """Runs this rank's chunks forward and backward one micro-batch at a time, holding what each
    backward needs (the received input, the output) from its forward until then."""

    def __init__(
        self, model, optimizer, micro_batches, loss_fn, total_tokens, *, forward_only: bool, trace
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.micro_batches = micro_batches
        self.loss_fn = loss_fn
        self.total_tokens = total_tokens
        self.forward_only = forward_only
        self.trace = trace
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=total_tokens.device)
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.backwards_left = [len(micro_batches)] * model.num_chunks
        self.unsent: torch.Tensor | None = None  # the last forward's output until `output_sent`

    def forward(self, chunk: int, micro_batch: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """Run `chunk` on a micro-batch (`hidden`: what the previous virtual stage sent, None for the
        first); returns the hidden states to send on, or None from the last chunk (the loss)."""
        record(self.trace, "F", micro_batch, chunk)
        model, batch = self.model, self.micro_batches[micro_batch]
        first, last = model.chunk_is_first(chunk), model.chunk_is_last(chunk)
        assert first == (hidden is None), f"chunk {chunk}: input hidden states given={hidden is not None}"
        if hidden is not None and not self.forward_only:
            hidden.requires_grad_(True)  # a leaf: its .grad is what backward sends to the previous stage
        output = model.forward_chunk(
            chunk,
            tokens=batch["tokens"] if first else None,
            hidden=hidden,
            position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"] if last else None,
        )
        if last:
            micro_sum = self.loss_fn(output, batch)  # output: per-token loss [b, s]
            self.loss_sum += micro_sum.detach()
            output = micro_sum / self.total_tokens
        if not self.forward_only:
            self.saved[(chunk, micro_batch)] = (hidden, output)
            self.unsent = None if last else output
        return None if last else output.detach()

    def output_sent(self) -> None:
        """The last forward's output reached the next stage (its send completed): free its data until its
        backward, which needs only its graph (`free_output_data`)."""
        if self.unsent is not None:
            free_output_data(self.unsent)
            self.unsent = None

    def backward(self, chunk: int, micro_batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of a micro-batch's forward through `chunk` (`grad`: the gradient of its output from
        the next virtual stage, None for the last chunk); returns its input's gradient, None for the first."""
        record(self.trace, "B", micro_batch, chunk)
        hidden, output = self.saved.pop((chunk, micro_batch))
        assert (grad is None) == self.model.chunk_is_last(chunk), f"chunk {chunk}: output gradient mismatch"
        self.backwards_left[chunk] -= 1
        backward_step(self.optimizer, output, grad, last_micro_batch=self.backwards_left[chunk] == 0)
        if hidden is None:
            return None
        if hidden.grad is None:
            raise RuntimeError(f"chunk {chunk}'s output does not depend on its input hidden states")
        return hidden.grad


# --------------------------------------------------------------------------- point to point
class PipelineP2P:
    """Messages between this rank and its neighbours in the pipeline group, all of `shape` and `dtype`.

    `communicate` is the general step (any of: send to the next rank, receive from the previous, send to
    the previous, receive from the next, around the ring); the named methods are the 1F1B steps, which
    do nothing (and receive None) past the first and last stage.
    """

    def __init__(self, parallel_state: ParallelState, shape, dtype: torch.dtype) -> None:
        group = parallel_state.pp_group
        self.group = group
        self.rank = parallel_state.rank
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = parallel_state.device
        self.next_rank = group.ranks[(group.rank + 1) % group.size]
        self.prev_rank = group.ranks[(group.rank - 1) % group.size]
        self.is_first = group.rank == 0
        self.is_last = group.rank == group.size - 1

    def recv_forward(self) -> torch.Tensor | None:
        return None if self.is_first else self.communicate(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor | None) -> None:
        if not self.is_last:
            self.communicate(send_next=output)

    def recv_backward(self) -> torch.Tensor | None:
        return None if self.is_last else self.communicate(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        if not self.is_first:
            self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.is_last else self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.is_first else self.communicate(send_prev=input_grad, recv_prev=True)[0]

    def communicate(
        self,
        *,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One schedule step's messages, posted together and waited for; returns (received from the
        previous rank, received from the next rank), None where nothing was received."""
        from_prev = self._buffer() if recv_prev else None
        from_next = self._buffer() if recv_next else None
        ops = []
        if send_next is not None:
            ops.append(
                self._op(dist.isend, self._checked(send_next, "activations"), self.next_rank, ACTIVATION_TAG)
            )
        if from_prev is not None:
            ops.append(self._op(dist.irecv, from_prev, self.prev_rank, ACTIVATION_TAG))
        if send_prev is not None:
            ops.append(
                self._op(dist.isend, self._checked(send_prev, "gradients"), self.prev_rank, GRADIENT_TAG)
            )
        if from_next is not None:
            ops.append(self._op(dist.irecv, from_next, self.next_rank, GRADIENT_TAG))
        if ops:
            self._run(ops)
        return from_prev, from_next

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _op(self, function, tensor: torch.Tensor, peer: int, tag: int):
        return dist.P2POp(function, tensor, peer, self.group.pg, tag)

    def _checked(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """`tensor` ready to send (contiguous), its bytes counted in `COMM_BYTES` under the pp group."""
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"rank {self.rank}: pipeline {what} of shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                f"but the stages exchange {self.shape} {self.dtype} (model.pipeline_hidden_shape, model dtype)"
            )
        count_send(self.group, tensor)
        return tensor.contiguous()

    def _run(self, ops: list) -> None:
        try:
            with COMM_TIMER.measure():
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
        except Exception as error:  # noqa: BLE001 - a neighbour's exit or the timeout: say who and why
            peers = sorted({op.peer for op in ops})
            raise PipelineError(
                f"rank {self.rank}: pipeline send/receive with rank(s) {peers} failed: {error}"
            ) from error


# --------------------------------------------------------------------------- 1F1B
def _run_1f1b(stage: _StageRunner, p2p: PipelineP2P, num_micro_batches: int, forward_only: bool) -> None:
    """Warm-up forwards, steady 1F1B, cool-down backwards (Megatron's non-interleaved schedule)."""
    m = num_micro_batches
    if forward_only:
        for micro_batch in range(m):
            p2p.send_forward(stage.forward(0, micro_batch, p2p.recv_forward()))
        return
    warmup = min(p2p.group.size - p2p.group.rank - 1, m)
    for micro_batch in range(warmup):
        p2p.send_forward(stage.forward(0, micro_batch, p2p.recv_forward()))
        stage.output_sent()
    steady = m - warmup
    hidden = p2p.recv_forward() if steady else None
    for i in range(steady):
        output_grad = p2p.send_forward_recv_backward(stage.forward(0, warmup + i, hidden))
        stage.output_sent()
        input_grad = stage.backward(0, i, output_grad)
        if i == steady - 1:
            p2p.send_backward(input_grad)
        else:
            hidden = p2p.send_backward_recv_forward(input_grad)
    for micro_batch in range(steady, m):
        p2p.send_backward(stage.backward(0, micro_batch, p2p.recv_backward()))


# --------------------------------------------------------------------------- interleaved 1F1B
def interleaved_chunk(k: int, pp: int, num_chunks: int, *, forward: bool) -> int:
    """The chunk of this rank's k-th forward (or backward) in the interleaved schedule."""
    chunk = (k % (pp * num_chunks)) // pp
    return chunk if forward else num_chunks - 1 - chunk


def interleaved_micro_batch(k: int, pp: int, num_chunks: int) -> int:
    """The micro-batch of this rank's k-th forward (or backward) in the interleaved schedule."""
    return (k // (pp * num_chunks)) * pp + k % pp


def interleaved_warmup(
    pp: int, rank: int, num_micro_batches: int, num_chunks: int, forward_only=False
) -> int:
    """Forwards rank `rank` runs before its first backward in the interleaved schedule."""
    total = num_micro_batches * num_chunks
    if forward_only or num_micro_batches == pp:
        return total
    return min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, total)


class _Interleaved:
    """Megatron's interleaved 1F1B on one rank. Received tensors wait in one queue per chunk (a chunk's
    forwards, and its backwards, run in micro-batch order, so each queue is consumed in arrival order)."""

    def __init__(
        self, stage: _StageRunner, p2p: PipelineP2P, num_micro_batches: int, num_chunks: int, forward_only
    ):
        self.stage, self.p2p = stage, p2p
        self.pp, self.vp = p2p.group.size, num_chunks
        self.total = num_micro_batches * num_chunks
        self.forward_only = forward_only
        self.warmup = interleaved_warmup(self.pp, p2p.group.rank, num_micro_batches, num_chunks, forward_only)
        self.all_warmup = self.warmup == self.total
        self.inputs: list[deque] = [deque() for _ in range(num_chunks)]
        self.grads: list[deque] = [deque() for _ in range(num_chunks)]

    def chunk(self, k: int, *, forward: bool) -> int:
        return interleaved_chunk(k, self.pp, self.vp, forward=forward)

    def forward(self, k: int) -> torch.Tensor | None:
        chunk = self.chunk(k, forward=True)
        hidden = None if self.p2p.is_first and chunk == 0 else self.inputs[chunk].popleft()
        return self.stage.forward(chunk, interleaved_micro_batch(k, self.pp, self.vp), hidden)

    def backward(self, k: int) -> torch.Tensor | None:
        chunk = self.chunk(k, forward=False)
        grad = None if self.p2p.is_last and chunk == self.vp - 1 else self.grads[chunk].popleft()
        return self.stage.backward(chunk, interleaved_micro_batch(k, self.pp, self.vp), grad)

    def run(self) -> None:
        if not self.p2p.is_first:
            self.inputs[0].append(self.p2p.communicate(recv_prev=True)[0])
        self.run_warmup()
        self.run_steady()
        if not self.forward_only:
            self.run_cooldown()

    def run_warmup(self) -> None:
        for k in range(self.warmup):
            output = self.forward(k)
            next_chunk = self.chunk(k + 1, forward=True)
            recv_prev = not (self.p2p.is_first and next_chunk == 0) and k != self.total - 1
            # the last warm-up step also receives the first backward's gradient
            recv_next = k == self.warmup - 1 and not self.forward_only and not self.all_warmup
            recv_next = recv_next and not self.p2p.is_last
            hidden, grad = self.p2p.communicate(send_next=output, recv_prev=recv_prev, recv_next=recv_next)
            self.stage.output_sent()
            if recv_prev:
                self.inputs[next_chunk].append(hidden)
            if recv_next:
                self.grads[self.vp - 1].append(grad)

    def run_steady(self) -> None:
        pp, vp, p2p = self.pp, self.vp, self.p2p
        steady = self.total - self.warmup
        for k in range(steady):
            forward_k = k + self.warmup
            output = self.forward(forward_k)
            input_grad = self.backward(k)
            if p2p.is_first:  # what arrives from rank P - 1 is for the chunk after one of its forwards
                next_forward_chunk = self.chunk(forward_k - (pp - 1), forward=True) + 1
                recv_prev = next_forward_chunk < vp
            else:
                next_forward_chunk, recv_prev = self.chunk(forward_k + 1, forward=True), True
            if p2p.is_last:  # what arrives from rank 0 is for the chunk before one of its backwards
                next_backward_chunk = self.chunk(k - (pp - 1), forward=False) - 1
                recv_next = k >= pp - 1 and next_backward_chunk >= 0
            else:
                next_backward_chunk, recv_next = self.chunk(k + 1, forward=False), True
            recv_prev = recv_prev and k != steady - 1
            hidden, grad = p2p.communicate(
                send_next=output, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next
            )
            self.stage.output_sent()
            if recv_prev:
                self.inputs[next_forward_chunk].append(hidden)
            if recv_next:
                self.grads[next_backward_chunk].append(grad)

    def run_cooldown(self) -> None:
        if self.all_warmup and not self.p2p.is_last:
            self.grads[self.vp - 1].append(self.p2p.communicate(recv_next=True)[1])
        for k in range(self.total - self.warmup, self.total):
            input_grad = self.backward(k)
            next_chunk = self.chunk(k + 1, forward=False)
            recv_next = not (self.p2p.is_last and next_chunk == self.vp - 1) and k != self.total - 1
            _, grad = self.p2p.communicate(send_prev=input_grad, recv_next=recv_next)
            if recv_next:
                self.grads[next_chunk].append(grad)


# --------------------------------------------------------------------------- bounds and logs
def in_flight_limit(pp: int, rank: int, num_micro_batches: int, num_chunks: int = 1) -> int:
    """The most activation sets (forwards whose backward has not run) pipeline rank `rank` holds at once:
    min(pp - rank, m) for 1F1B, its warm-up plus one (at most every forward) for interleaved 1F1B."""
    if num_chunks == 1:
        return min(pp - rank, num_micro_batches)
    warmup = interleaved_warmup(pp, rank, num_micro_batches, num_chunks)
    return min(warmup + 1, num_micro_batches * num_chunks)


def send_bytes(pp: int, rank: int, num_micro_batches: int, num_chunks: int, message_bytes: int) -> int:
    """Bytes pipeline rank `rank` sends in one training step (what `COMM_BYTES` counts under the pp
    group): every chunk's output to the next virtual stage but the last's, every chunk's input gradient
    to the previous one but the first's, one `message_bytes` message per micro-batch each."""
    if pp == 1:
        return 0
    stages = [chunk * pp + rank for chunk in range(num_chunks)]
    forwards = sum(stage != pp * num_chunks - 1 for stage in stages)
    backwards = sum(stage != 0 for stage in stages)
    return num_micro_batches * (forwards + backwards) * message_bytes


def format_trace(trace: Trace) -> str:
    """`trace` on one line for a debug log: "F0 F1 B0 ...", with ".chunk" when there are several chunks."""
    chunked = any(chunk for _, _, chunk in trace)
    return " ".join(f"{kind}{mb}.{chunk}" if chunked else f"{kind}{mb}" for kind, mb, chunk in trace)

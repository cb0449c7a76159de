"""Fault injection in the training loop (test-only): what `MEGATRON_FAULTS` does at run time.

The syntax, the matching and the save-time faults are `megatron.config.faults` (a layer the checkpoint
package can import; the checkpointer calls `FaultPlan.in_save` itself). This module adds the hooks of the
loop, placed by the loop's owners:

- `at_iteration_start(run)` (train.py, before the iteration's first beat): kill (SIGKILL this process),
  hang (block forever inside a collective: a receive from a peer that never sends, on the default
  process group; without one, a wait that never ends), slow (sleep `seconds`), and it arms nan and spike
  for the iteration.
- nan: a gradient hook on the parameter (`param`: the first whose name contains it; default the first
  parameter of this rank's model) replaces this rank's local gradient by NaN as backward produces it,
  before it reaches the gradient buffer and its reduction (with --overlap-grad-reduce too).
- `scale_loss(loss_sum)` (step.py, the training forward_backward): multiplies this rank's loss sum by
  `factor` before the loss is reduced over the ranks: a loss spike every rank sees.
- `wrap_dataset(dataset, ...)` (train.py, the training split): data_hang, the data worker that builds a
  sample of that iteration blocks forever (and exits once its parent process is gone).

Every hook site is guarded by `faults.active`, False when MEGATRON_FAULTS is unset.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from megatron.config.faults import ENV, KINDS, Fault, FaultPlan, announce, parse_faults

__all__ = ["ENV", "KINDS", "Fault", "Faults", "parse_faults"]

_HANG_TAG = 0x7FA17  # a tag no real send uses: the receive matches nothing


class Faults(FaultPlan):
    """`FaultPlan` plus the training-loop hooks (see the module docstring)."""

    def __init__(self, faults: list[Fault] | None = None, *, attempt: int = 0) -> None:
        super().__init__(faults, attempt=attempt)
        self._spike: float | None = None  # factor armed for the current iteration
        self._nan_hook = None

    def at_iteration_start(self, run) -> None:
        """Kill, hang or slow this rank at the start of iteration `run.state.iteration + 1`; arm nan and
        spike for it."""
        iteration, rank = run.state.iteration + 1, run.parallel_state.rank
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None
        fault = self.fire("kill", iteration, rank)
        if fault is not None:
            announce(fault, rank, iteration, "SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        fault = self.fire("slow", iteration, rank)
        if fault is not None:
            time.sleep(fault.seconds)
        fault = self.fire("spike", iteration, rank)
        self._spike = fault.factor if fault is not None else None
        if fault is not None:
            announce(fault, rank, iteration, f"loss x {fault.factor:g}")
        fault = self.fire("nan", iteration, rank)
        if fault is not None:
            self._arm_nan(fault, run.model, rank, iteration)
        fault = self.fire("hang", iteration, rank)
        if fault is not None:
            _hang(fault, run, rank, iteration)

    def scale_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """This rank's loss sum, times the spike factor armed for this iteration (once)."""
        factor, self._spike = self._spike, None
        return loss_sum if factor is None else loss_sum * factor

    def _arm_nan(self, fault: Fault, model: torch.nn.Module, rank: int, iteration: int) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        chosen = [(name, p) for name, p in named if fault.param is None or fault.param in name][:1]
        if not chosen:
            announce(fault, rank, iteration, f"no parameter of this rank's model matches {fault.param!r}")
            return
        name, param = chosen[0]
        announce(fault, rank, iteration, f"gradient of {name} set to NaN")
        self._nan_hook = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    def wrap_dataset(self, dataset, *, samples_per_iteration: int, rank: int):
        """The training dataset, or (data_hang for this rank) a view whose items of the fault's
        iterations never return. Sample k of the run belongs to iteration k // samples_per_iteration + 1
        (the loader consumes samples in index order, a global batch per iteration)."""
        if not self.active:
            return dataset
        for fault in self.faults:
            if fault.kind == "data_hang" and fault.matches(fault.first, rank, self.attempt):
                fault.fired.append(fault.first)
                first = (fault.first - 1) * samples_per_iteration
                last = fault.last * samples_per_iteration
                return _HangingDataset(dataset, first, last, rank, fault.first, os.getpid())
        return dataset


def _hang(fault: Fault, run, rank: int, iteration: int) -> None:
    """Block forever inside a collective: receive from a peer that never sends."""
    import torch.distributed as dist

    watchdog = getattr(run, "watchdog", None)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    peer = (rank + 1) % world
    what = f"receive from rank {peer} that never sends" if world > 1 else "wait that never ends"
    announce(fault, rank, iteration, what)
    if watchdog is not None:
        watchdog.beat(iteration, f"injected hang ({what})")
    if world > 1:
        device = run.parallel_state.device if run.parallel_state.backend == "nccl" else torch.device("cpu")
        dist.recv(torch.zeros(1, device=device), src=peer, tag=_HANG_TAG)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # NCCL: the host blocks here
    threading.Event().wait()


class _HangingDataset(torch.utils.data.Dataset):
    """`dataset` whose items first..last-1 never return (data_hang)."""

    def __init__(self, dataset, first: int, last: int, rank: int, iteration: int, parent: int) -> None:
        self.dataset, self.first, self.last = dataset, first, last
        self.rank, self.iteration, self.parent = rank, iteration, parent

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if self.first <= index < self.last:
            self._block(index)
        return self.dataset[index]

    def _block(self, index: int) -> None:
        fault = Fault("data_hang", self.iteration, self.iteration, rank=self.rank)
        announce(fault, self.rank, self.iteration, f"the data worker never returns sample {index}")
        in_worker = torch.utils.data.get_worker_info() is not None
        while not in_worker or os.getppid() == self.parent:
            time.sleep(0.5)
        os._exit(1)  # a worker orphaned by its (killed) training process

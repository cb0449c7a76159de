"""Sharded, atomic, reshardable checkpoints (format "megatron-starcoder-dcp/1") with exact resume.

Layout under the `--save`/`--load` directory:
```
latest_checkpointed_iteration.txt     "20": written atomically, only after iter_0000020/ is final
iter_0000020/                         written as .iter_0000020.tmp-<nonce>/, fsynced, then renamed
    .metadata, __<rank>_0.distcp      torch.distributed.checkpoint (DCP): every tensor
    common.json                       rank 0: format, iteration, consumed samples, extra, scheduler and
                                      grad-scaler states, the config, the saving layout
    rng/rank_00003.json               each rank: python and numpy generator states
    manifest.json                     written last: bytes and BLAKE2b hash of every other file
```
DCP keys are logical (the same at every layout), so any layout loads any checkpoint:
`model/<name>` (model dtype), `optimizer/exp_avg/<name>`, `optimizer/exp_avg_sq/<name>`,
`optimizer/master/<name>` (fp32; masters only for parameters not in fp32), `optimizer/step`, and per
global rank `rng/rank_00003/{torch,cuda,tracker_cpu,tracker_cuda}` (uint8 generator states). In one
process the tensors are plain full tensors; with several they are DTensors on this pipeline stage's
(dp, tp) device mesh (Replicate over dp, Shard(partition_dim) over tp for tensor-parallel parameters),
so DCP records each rank's chunk of the full logical shape. The last pipeline stage's copy of the tied
word embedding (`pipeline_duplicate`) is not saved; it loads from the first stage's key. Under the
distributed optimizer each rank saves and loads only its own moment and master fragments, as
rectangular chunks of the same logical tensors (`fragments`).

Saving: DCP writes into the temporary directory over a gloo process group that belongs to the
checkpointer alone (created once, collectively, by `Checkpointer`), so a background save never shares
a process group with training. Each rank fsyncs and hashes the files it wrote; rank 0 merges the
hashes into manifest.json, fsyncs, renames the directory, fsyncs the parent and only then replaces the
tracker. With `async_save`, `save` copies every tensor to the CPU (so training may go on changing the
model) and the writing runs in a thread; `wait` (also called by the next save or load) finishes it and
raises `CheckpointError` if it failed. A crash at any point leaves the previous checkpoint intact.

Loading verifies the manifest (the files are split across ranks for hashing), falls back to the newest
complete checkpoint when the tracked one is incomplete or corrupt (saying so), checks every shape
before anything is written into the model, reads the tensors (CPU parameters and live moments in
place, the rest into CPU buffers copied after: `load_plan`) and sets the optimizer (exact AdamW state:
moments, step, fp32 masters) and the random generators of every rank (when the layout matches the
saving layout). Corrupt data, found as it is read, may leave part of it in the model: the fallback
overwrites it, or the load fails. Nothing is unpickled beyond DCP's own metadata classes.

This module drives both; the parts live beside it: `staging` (what a save captures), `files` (names,
durable writes, manifest entries, housekeeping, the kill tests' fault points), `dcp_io` (DCP, the
checkpoint process group, tensor layouts), `verify` (manifest checks, common.json), `load_plan` (what
each rank loads and where it goes), `replicated` (DP-replicated tensors read once per DP group and
exchanged over it), `fragments` (the distributed optimizer's fragments as chunks, DCP planners, bytes
staged and read), `readers` (one-process readers for tools). See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path

from megatron.checkpoint import single_file
from megatron.checkpoint.dcp_io import (
    CheckpointGroup,
    TensorLayout,
    dcp_failure_type,
    dcp_save,
    describe,
    read_metadata,
)
from megatron.checkpoint.dcp_streams import checksummed_reads
from megatron.checkpoint.directory import (
    TRACKER_FILENAME,
    LoadedCheckpoint,
    checkpoint_dir,
    find_checkpoints,
    fsync_dir,
    read_tracker,
    replace_directory,
    write_tracker,
)
from megatron.checkpoint.files import (
    COMMON_FILENAME,
    FAULT_ENV,
    FAULT_POINTS,
    FORMAT,
    MANIFEST_FILENAME,
    METADATA_FILENAME,
    RNG_DIRNAME,
    delete_old,
    fault,
    file_entry,
    fsync_file,
    relative_files,
    remove_leftovers,
    rng_json_name,
    storage_failure,
    write_json,
)
from megatron.checkpoint.load_plan import LoadPlan, load_object_state, restore_generators
from megatron.checkpoint.ownership import (
    SaveLock,
    check_ownership,
    check_writable,
    fresh_lineage,
    job_run_id,
    planned_lineage,
    read_lineage,
    untracked_checkpoints,
)
from megatron.checkpoint.snapshot import BufferPool, Snapshot, fenceable
from megatron.checkpoint.staging import SaveJob, capture_rng, plain_json, saving_layout, stage_tensors
from megatron.checkpoint.verify import data_problems, read_common, verification_problems
from megatron.config.faults import FaultPlan
from megatron.log import get_logger
from megatron.parallel.state import ParallelState

logger = get_logger(__name__)


class CheckpointError(RuntimeError):
    """A save failed (in the background with `async_save`); the message names the checkpoint and why
    (a full disk or an I/O error by name: ENOSPC, EIO). The previous checkpoint is intact."""


class Checkpointer:
    """Saves and loads sharded checkpoints for one run (see the module docstring).

    Every rank constructs it (collective: it creates the checkpoint process group and device mesh) and
    calls `save`, `wait` and `load` together. `async_save`: `save` returns once the tensors are copied to
    the CPU and the files are written in a background thread. `keep_last_k`: after each save is final,
    delete older complete `iter_*` directories beyond the newest k (never the one just written, never
    an iteration in `protected`, never another lineage's once `claim`ed unless `overwrite`).
    `faults`: the test-only fault plan (default: from MEGATRON_FAULTS) whose `in_save` runs as each rank
    finishes writing its files.
    """

    def __init__(
        self,
        parallel_state: ParallelState,
        *,
        async_save: bool = False,
        keep_last_k: int | None = None,
        faults: FaultPlan | None = None,
    ):
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(
                f"--keep-last-k must be at least 1 (or unset to keep every checkpoint), got {keep_last_k}"
            )
        fault_point = os.environ.get(FAULT_ENV)
        if fault_point and fault_point not in FAULT_POINTS:
            raise ValueError(
                f"{FAULT_ENV}={fault_point!r} is not a fault point; valid: {', '.join(FAULT_POINTS)}"
            )
        self.parallel_state = parallel_state
        self.async_save = async_save
        self.keep_last_k = keep_last_k
        self.group = CheckpointGroup(parallel_state)
        self.layout = TensorLayout(parallel_state)
        self._pending: tuple[SaveJob, threading.Thread, list] | None = None
        self._buffers = BufferPool()
        self._snapshot: Snapshot | None = None
        self._fenced = 0.0
        self.faults = faults if faults is not None else FaultPlan.from_env()
        self.run_id = job_run_id()
        # what common.json records (rank 0's): set by `claim` (a fresh run's) and by `load` (inherited);
        # None until then (checkpointers of tests and tools that do not claim)
        self.lineage: str | None = None
        self.claimed, self.overwrite = False, False
        # iterations keep-last-k never deletes (the last checkpoint before a run of skipped steps): the
        # training loop adds them (`protect`)
        self.protected: set[int] = set()
        self._lock: SaveLock | None = None
        self.failed_iteration: int | None = None  # the last save that failed (the run goes on without it)

    # ------------------------------------------------------------------ ownership
    def claim(
        self, save_dir, *, load_dir=None, finetune=False, overwrite=False, lock_stale_minutes=30.0
    ) -> None:
        """Collective, before anything is written under `save_dir`: rank 0 takes the run lock on it and
        checks that it holds no other lineage's checkpoints (unless `overwrite`); every rank raises the
        same ValueError (naming the lock's owner, or the other run's checkpoints, and how to proceed)
        when either fails. From then on replacing or deleting an `iter_*` directory needs it to be this
        run's lineage (or `overwrite`). `release` gives the lock back."""
        outcome = None
        if self.group.rank == 0:
            try:
                lineage = planned_lineage(load_dir, finetune, self.run_id)
                if save_dir:
                    check_writable(save_dir)
                    self._lock = SaveLock.acquire(save_dir, self.run_id, lock_stale_minutes)
                    if not overwrite:
                        check_ownership(save_dir, lineage, load_dir)
                outcome = ("ok", lineage)
            except (ValueError, OSError) as exc:
                self.release()
                outcome = ("error", str(exc))
        outcome = self.group.broadcast(outcome)
        if outcome[0] != "ok":
            raise ValueError(outcome[1])
        self.lineage, self.claimed, self.overwrite = outcome[1], True, overwrite

    def release(self) -> None:
        """Give back the run lock (rank 0; nothing elsewhere). Idempotent; also done at exit."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def protect(self, iteration: int) -> None:
        """Never delete the checkpoint of `iteration` under keep-last-k (it does not count among the k)."""
        self.protected.add(int(iteration))

    def owns(self, directory: Path) -> bool:
        """May this run replace or delete checkpoint `directory`: its own lineage's, or not `claim`ed,
        or --overwrite-checkpoints."""
        return not self.claimed or self.overwrite or read_lineage(directory) == self.lineage

    # ------------------------------------------------------------------ save
    def save(
        self,
        save_dir,
        iteration: int,
        model,
        optimizer,
        scheduler,
        scaler,
        *,
        consumed_samples: int,
        config,
        extra=None,
    ) -> Path:
        """Write `save_dir/iter_XXXXXXX/` atomically and point the tracker at it; returns that directory.
        With `async_save` it returns right after staging (the directory appears later; `wait`).
        Raises CheckpointError when writing fails (with `async_save`: from `wait` or the next save)."""
        self.wait()
        root = Path(save_dir)
        # async: copies, so training may go on changing the model while the files are written; taken
        # off the save call when the optimizer's next step can be fenced until they are done
        torch_optimizer = fenceable(optimizer) if self.async_save else None
        snapshot = Snapshot(self._buffers) if torch_optimizer is not None else None
        copy = snapshot.take if snapshot is not None else self.async_save
        state = stage_tensors(model, optimizer, self.parallel_state, self.layout, self.group, copy=copy)
        rng_record, rng_tensors = capture_rng(self.parallel_state)
        state.update(rng_tensors)
        common = {
            "format": FORMAT,
            "iteration": int(iteration),
            "consumed_samples": int(consumed_samples),
            "extra": plain_json(extra or {}),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "config": plain_json(config),
            "layout": saving_layout(self.parallel_state, optimizer),
            "lineage": self.lineage,
            "run_id": self.run_id,
        }
        final = checkpoint_dir(root, iteration)
        job = SaveJob(root, final, self._make_tmp(root, final), int(iteration), state, rng_record, common)
        if not self.async_save:
            try:
                return self._write(job)
            except CheckpointError:
                self.failed_iteration = job.iteration
                raise
        outcome: list = []
        if snapshot is not None:
            snapshot.start(torch_optimizer)
        self._snapshot = snapshot
        thread = threading.Thread(
            target=self._write_in_background, args=(job, outcome, snapshot), daemon=True
        )
        thread.start()
        self._pending = (job, thread, outcome)
        return final

    def wait(self) -> Path | None:
        """Finish a pending background save (rename, tracker, keep-last-k); its final directory, or None
        when none was pending. Raises CheckpointError naming the checkpoint when the write failed."""
        if self._pending is None:
            return None
        job, thread, outcome = self._pending
        self._pending = None
        thread.join()
        if self._snapshot is not None:
            self._snapshot.fence()  # removes the hook if no step came
            self._fenced += self._snapshot.fence_seconds
            self._snapshot = None
        result = outcome[0]
        if isinstance(result, BaseException):
            self.failed_iteration = job.iteration
        if isinstance(result, CheckpointError):
            raise CheckpointError(f"background save: {result}") from result
        if isinstance(result, BaseException):
            raise CheckpointError(
                f"background save of iteration {job.iteration} to {job.final} failed: {type(result).__name__}: {result}"
            ) from result
        return result

    @property
    def fence_seconds(self) -> float:
        """Time training spent blocked until async saves' copies were done (every save so far): part of
        what a save costs training, with the time inside `save` and `wait`."""
        return self._fenced + (self._snapshot.fence_seconds if self._snapshot is not None else 0.0)

    def _write_in_background(self, job: SaveJob, outcome: list, snapshot: Snapshot | None) -> None:
        try:
            if snapshot is not None:
                snapshot.copy_cpu()
            outcome.append(self._write(job))
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), never swallowed
            outcome.append(exc)

    def _make_tmp(self, root: Path, final: Path) -> Path:
        """Rank 0 creates the temporary directory (clearing leftovers of interrupted saves) and tells
        every rank its name."""
        outcome = None
        if self.group.rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                remove_leftovers(root)
                tmp = root / f".{final.name}.tmp-{secrets.token_hex(4)}"
                (tmp / RNG_DIRNAME).mkdir(parents=True)
                outcome = ("ok", str(tmp))
            except OSError as exc:
                outcome = ("error", f"cannot create a checkpoint directory in --save {root}: {exc}")
        outcome = self.group.broadcast(outcome)
        if outcome[0] != "ok":
            raise CheckpointError(outcome[1])
        return Path(outcome[1])

    def _write(self, job: SaveJob) -> Path:
        """Every rank: DCP files and its RNG record, fsynced and hashed; rank 0 commits; every rank
        learns the outcome (so no rank waits forever on one that failed)."""
        report = self._write_rank_files(job)
        reports = self.group.all_gather(report)
        verdict = self._commit(job, reports) if self.group.rank == 0 else None
        verdict = self.group.broadcast(verdict)
        if verdict is not None:
            raise CheckpointError(f"saving iteration {job.iteration} to {job.final} failed: {verdict}")
        return job.final

    def _write_rank_files(self, job: SaveJob) -> dict:
        rank = self.group.rank
        try:
            files = dcp_save(job.state, job.tmp, self.group.pg)  # data files: checksummed as written
            write_json(job.tmp / rng_json_name(self.parallel_state.rank), job.rng_record)
            small = [rng_json_name(self.parallel_state.rank)]
            if rank == 0:
                write_json(job.tmp / COMMON_FILENAME, job.common)
                fsync_file(job.tmp / METADATA_FILENAME)
                small += [COMMON_FILENAME, METADATA_FILENAME]
            files.update({relative: file_entry(job.tmp / relative) for relative in small})
            if self.faults.active:  # test-only: enospc, kill_in_save (MEGATRON_FAULTS)
                self.faults.in_save(job.iteration, self.parallel_state.rank, job.tmp / small[0])
            return {"files": files}
        except (Exception, dcp_failure_type()) as exc:  # noqa: BLE001 - reported to rank 0, raised everywhere
            # a full disk or an I/O error by name (every rank sees DCP's failure: each names it)
            described = storage_failure(exc, job.root) or describe(exc)
            named = described.startswith(("rank ", "ranks "))
            return {"error": described if named else f"rank {rank}: {described}"}

    def _commit(self, job: SaveJob, reports: list[dict]) -> str | None:
        """Rank 0: manifest, fsync, rename, tracker, keep-last-k. Returns the failure, or None."""
        # DCP raises the same failure on every rank: report each once
        errors = list(dict.fromkeys(report["error"] for report in reports if "error" in report))
        try:
            if errors:
                return "; ".join(errors)
            files = {}
            for report in reports:
                files.update(report["files"])
            for relative in relative_files(job.tmp):  # anything DCP wrote that no rank claimed
                if relative not in files:
                    files[relative] = file_entry(job.tmp / relative)
            write_json(
                job.tmp / MANIFEST_FILENAME, {"format": FORMAT, "iteration": job.iteration, "files": files}
            )
            fsync_dir(job.tmp / RNG_DIRNAME)
            fsync_dir(job.tmp)
            fault("before_rename")
            if job.final.exists() and not self.owns(job.final):
                return (
                    f"{job.final} holds a checkpoint of another run (lineage {read_lineage(job.final)}); "
                    "not replacing it (--overwrite-checkpoints allows it)"
                )
            replace_directory(job.tmp, job.final)
            fsync_dir(job.root)
            fault("before_tracker")
            write_tracker(job.root, job.iteration)
        except Exception as exc:  # noqa: BLE001 - becomes the CheckpointError of every rank
            return f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(job.tmp, ignore_errors=True)  # gone after a successful rename
        if self.keep_last_k is not None:
            delete_old(job.root, job.iteration, self.keep_last_k, owns=self.owns, protect=self.protected)
        return None

    # ------------------------------------------------------------------ load
    def load(
        self,
        load_dir,
        model,
        optimizer,
        scheduler,
        scaler,
        *,
        finetune: bool = False,
        load_optim: bool = True,
        load_rng: bool = True,
        iteration: int | None = None,
    ) -> LoadedCheckpoint | None:
        """Load the checkpoint the tracker under `load_dir` names (or, given `iteration`, that one: a
        rollback) into the given objects (None: no tracker). An incomplete or corrupt one is skipped for the newest complete one, with a log line;
        ValueError when none is usable or the model's shapes differ (nothing is written into the model
        before the checks that need no tensor data passed; after a ValueError from corrupt data the
        model's weights are undefined). `finetune`: model weights only, iteration 0. `load_optim=False`:
        fresh optimizer, scheduler and loss scale. `load_rng=False`: keep the current generators."""
        self.wait()
        root = Path(load_dir)
        tracked = read_tracker(root) if iteration is None else iteration
        if tracked is None:  # refused unless every iter_* there is this job's (a restart before a tracker)
            own = untracked_checkpoints(root, fresh_lineage(self.run_id) if self.run_id else None)
            if not own:
                return None
            logger.info(
                f"NOTE: --load {root} has no tracker; its checkpoints are this job's: resuming the newest"
            )
            tracked = int(own[0].name.removeprefix("iter_"))
        directory = checkpoint_dir(root, tracked)
        single = (directory / single_file.MODEL_FILENAME).is_file()
        if single and not (directory / MANIFEST_FILENAME).exists():
            return self._load_single_file(
                root, directory, model, optimizer, scheduler, scaler, finetune, load_optim, load_rng
            )
        with_optimizer = optimizer is not None and load_optim and not finetune
        directory, common, plan, loaded = self._read_usable(
            root, tracked, model, optimizer if with_optimizer else None, load_rng and not finetune
        )
        restore_rng = plan.restore_rng
        if not finetune:  # a resumed run continues the lineage of what it loaded
            self.lineage = common.get("lineage")
        plan.apply_model(model, loaded)
        if optimizer is not None and not with_optimizer:
            optimizer.reload_model_params()
        if finetune:
            return LoadedCheckpoint(0, 0, directory, common.get("extra") or {})
        if with_optimizer:
            plan.apply_optimizer(optimizer, loaded)
            load_object_state(scheduler, common.get("scheduler"))
            load_object_state(scaler, common.get("grad_scaler"))
        if restore_rng:
            restore_generators(self.parallel_state, directory, loaded)
        return LoadedCheckpoint(
            int(common["iteration"]), int(common["consumed_samples"]), directory, common.get("extra") or {}
        )

    def _read_usable(self, root: Path, tracked, model, optimizer, load_rng: bool):
        """(directory, common, plan, CPU buffers) of the tracked checkpoint if it verifies, else of the
        newest one that does (logged). The data files' checksums are checked from the bytes the load
        reads (a fallback overwrites whatever a corrupt one read in place), the other files' before
        reading."""
        tracker = root / TRACKER_FILENAME
        tracked_dir = checkpoint_dir(root, tracked)
        candidates = [tracked_dir] + [path for _, path in find_checkpoints(root) if path != tracked_dir]
        reasons = []
        for directory in candidates:
            problems = self._problems(directory, data_checksums=False)
            if not problems:
                common = read_common(directory)
                restore_rng = load_rng and self._rng_layout_matches(common)
                plan = LoadPlan(model, optimizer, self.parallel_state, restore_rng)
                plan.check(directory, read_metadata(directory), self.group)
                loaded, problems = self._read_checked(directory, plan)
            if not problems:
                if reasons:
                    logger.info(
                        f"WARNING: checkpoint {tracked_dir} (named by {tracker}) is not usable: {reasons[0]}; "
                        f"loading {directory}, the newest complete checkpoint, instead"
                    )
                return directory, common, plan, loaded
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            reasons.append(problems[0] + more)
        raise ValueError(
            f"--load {root}: no usable checkpoint ({tracker} names {tracked_dir.name}): " + "; ".join(reasons)
        )

    def _read_checked(self, directory: Path, plan: LoadPlan) -> tuple[dict | None, list[str]]:
        """Read the plan's tensors into CPU buffers, checksumming each data file a rank reads whole as it
        reads it (the rest are hashed after, split across ranks): (buffers, []) or (None, problems)."""
        try:
            with checksummed_reads() as read:
                loaded = plan.load(directory, self.layout, self.group.pg)
        except ValueError:  # DCP could not parse a file: a damaged one is named, else the error stands
            problems = self._problems(directory)
            if not problems:
                raise
            return None, problems
        problems = data_problems(directory, self.group.rank, self.group.size, self.group.all_gather, read)
        return (None, problems) if problems else (loaded, [])

    def _problems(self, directory: Path, *, data_checksums: bool = True) -> list[str]:
        return verification_problems(
            directory, self.group.rank, self.group.size, self.group.all_gather, data_checksums=data_checksums
        )

    def _rng_layout_matches(self, common: dict) -> bool:
        saved, now = common.get("layout") or {}, saving_layout(self.parallel_state, None)
        keys = ("world", "tp", "pp", "dp")
        if all(saved.get(key) == now[key] for key in keys):
            return True
        logger.info(
            f"NOTE: random states not restored: saved at TP {saved.get('tp')} x PP {saved.get('pp')} x DP "
            f"{saved.get('dp')}, loading at TP {now['tp']} x PP {now['pp']} x DP {now['dp']}"
        )
        return False

    def _load_single_file(
        self, root, directory, model, optimizer, scheduler, scaler, finetune, load_optim, load_rng
    ):
        if self.parallel_state.world_size > 1:
            raise ValueError(
                f"{directory} is a single-file checkpoint ({single_file.MODEL_FILENAME}), which loads in "
                "one process only; resume it at world size 1 and save again to get a sharded checkpoint"
            )
        logger.info(
            f"> {directory} is a single-file checkpoint: loading it with megatron.checkpoint.single_file"
        )
        return single_file.load_checkpoint(
            root,
            model,
            optimizer,
            scheduler,
            scaler,
            finetune=finetune,
            load_optim=load_optim,
            load_rng=load_rng,
        )

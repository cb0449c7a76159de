"""Inspect, verify and consolidate sharded checkpoints (format "megatron-starcoder-dcp/1").

    python tools/checkpoint_util.py info CHECKPOINT [--tensors]
    python tools/checkpoint_util.py verify CHECKPOINT [--all]
    python tools/checkpoint_util.py consolidate CHECKPOINT --output model.safetensors [--dtype bf16]
    python tools/checkpoint_util.py consolidate CHECKPOINT --output model.pt [--prefix ""] [--overwrite]

CHECKPOINT is a --save directory (its tracked iteration, or --iteration N) or one iter_XXXXXXX directory.

No layout conversion is needed: these checkpoints are layout-free. Every tensor is stored under its
logical name with its full shape, and each rank's piece is recorded as a chunk of it
(torch.distributed.checkpoint), so a run at any TP x PP x DP layout loads (--load) a checkpoint saved
at any other layout directly. There is therefore no "convert to TP t / PP p" subcommand (the original
tool's merge-to-one-rank step, which ran out of memory on 15B, is not needed either).

consolidate writes one file with every tensor under --prefix (default "model/": the model weights,
named as model.named_parameters() names them, full logical shapes; --prefix "" takes everything:
optimizer moments, master weights, RNG states, keys unchanged). It streams: the safetensors header is
computed from the checkpoint's metadata first, then tensors are read one at a time (each assembled from
its chunks) and their bytes written at their offsets, so memory holds one tensor at a time, never the
model (peak: about twice the largest tensor above the interpreter, as DCP's reader briefly holds the
tensor's serialized bytes too; 0.24 GB of weights or 0.71 GB with the optimizer state both peaked at
+0.13 GB with a 67 MB largest tensor). A .pt output goes through a temporary safetensors file whose tensors are memory-mapped back for
torch.save (mapped file pages, which the kernel can evict, not copies). The checkpoint is verified
(sizes and checksums from its manifest: CRC32, or BLAKE2b in older checkpoints) first unless --skip-verify.
An existing --output file is replaced only with --overwrite (and only once the new file is complete);
a directory that cannot be written is reported before any work. verify and consolidate show progress
bars (bytes) on a terminal; --no-progress turns them off.

Exit status: 0 success, 1 a checkpoint failed verification, 2 a usage error (bad path or flag).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import torch

from megatron.checkpoint.directory import TRACKER_FILENAME, checkpoint_dir, read_tracker
from megatron.entry import check_writable_directory, os_error_text
from megatron.log import progress_bar

METADATA_FILENAME = ".metadata"

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class VerificationError(ValueError):
    """The checkpoint is there but failed verification (exit status 1, not 2)."""


# --------------------------------------------------------------------------------------------------
# Reading the DCP metadata


def read_metadata(directory: str | os.PathLike):
    """The checkpoint's DCP `Metadata` (shapes, dtypes, chunks). DCP pickles `.metadata`; it is read
    with `megatron.checkpoint`'s allow-listed unpickler, so a crafted file runs nothing."""
    from megatron.checkpoint import read_metadata as read_dcp_metadata

    try:
        return read_dcp_metadata(directory)
    except ValueError as error:
        raise VerificationError(str(error)) from error


def tensor_entries(metadata, prefix: str = "") -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(key, dtype, full shape, number of chunks) for every tensor whose key starts with `prefix`, in
    the order they were saved."""
    entries = []
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(item, "size"):  # BytesStorageMetadata has no size
            entries.append((key, item.properties.dtype, tuple(item.size), len(item.chunks)))
    return entries


# --------------------------------------------------------------------------------------------------
# Finding the checkpoint


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """The iteration directory named by `path`: itself when it holds a `.metadata`, else the tracked
    (or `iteration`) checkpoint under it. ValueError naming what is missing."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root} does not exist")
    if iteration is not None:
        directory = checkpoint_dir(root, iteration)
    elif (root / METADATA_FILENAME).is_file() or root.name.startswith("iter_"):
        directory = root
    else:
        tracked = read_tracker(root)
        if tracked is None:
            raise ValueError(
                f"{root} holds neither {METADATA_FILENAME} (a checkpoint directory) nor {TRACKER_FILENAME} "
                "(a --save directory)"
            )
        directory = checkpoint_dir(root, tracked)
    if not directory.is_dir():
        raise ValueError(f"{directory} does not exist (named by {root / TRACKER_FILENAME} or --iteration)")
    if not (directory / METADATA_FILENAME).exists() and (directory / "mp_rank_00").is_dir():
        raise ValueError(
            f"{directory} is a basic single-file checkpoint (mp_rank_00/model_optim_rng.pt), not a sharded "
            "one; it loads with torch.load(weights_only=True) as it is"
        )
    return directory


# --------------------------------------------------------------------------------------------------
# info


def _human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def _group(key: str) -> str:
    """`model/`, `optimizer/exp_avg/`, `rng/rank_00003/`...: the key without its last name part."""
    if key.startswith("model/"):
        return "model/"
    parts = key.split("/")
    if parts[0] == "optimizer" and len(parts) > 2:
        return f"optimizer/{parts[1]}/"
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else key


def _layout_line(layout: dict) -> str:
    if not layout:
        return "saving layout: not recorded"
    return (
        f"saved at TP {layout.get('tp')} x PP {layout.get('pp')} x DP {layout.get('dp')} "
        f"(world {layout.get('world')}); sequence parallel {'on' if layout.get('sequence_parallel') else 'off'}, "
        f"distributed optimizer {'on' if layout.get('distributed_optimizer') else 'off'}"
    )


def _model_line(config: dict) -> str:
    model = config.get("model", {}) if config else {}
    if not model:
        return "model: config not recorded"
    names = ("num_layers", "hidden_size", "num_attention_heads", "attention_head_type", "seq_length")
    return "model: " + ", ".join(f"{name} {model[name]}" for name in names if name in model)


def describe(directory: Path, *, list_tensors: bool = False) -> list[str]:
    """The lines `info` prints for one checkpoint directory."""
    from megatron.checkpoint import read_common

    common = read_common(directory)
    metadata = read_metadata(directory)
    lines = [
        f"checkpoint {directory}",
        f"format {common.get('format')}; iteration {common.get('iteration')}, "
        f"consumed samples {common.get('consumed_samples')}",
        _layout_line(common.get("layout") or {}),
        _model_line(common.get("config") or {}),
    ]
    manifest = directory / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        total = sum(entry["bytes"] for entry in files.values())
        lines.append(f"files: {len(files)} in the manifest, {_human_bytes(total)}")
    else:
        lines.append("files: manifest.json missing (incomplete checkpoint)")
    groups: dict[str, list[int]] = {}
    for key, dtype, shape, _ in tensor_entries(metadata):
        numel = int(torch.Size(shape).numel())
        count = groups.setdefault(_group(key), [0, 0, 0])
        count[0], count[1], count[2] = count[0] + 1, count[1] + numel, count[2] + numel * dtype.itemsize
    for group, (count, numel, nbytes) in groups.items():
        noun = "tensor " if count == 1 else "tensors"
        lines.append(f"  {group:<28} {count:>5} {noun} {numel:>14,} elements {_human_bytes(nbytes):>10}")
    if list_tensors:
        for key, dtype, shape, num_chunks in tensor_entries(metadata):
            dtype_name = str(dtype).removeprefix("torch.")
            lines.append(f"    {key:<60} {dtype_name:<9} {list(shape)!s:<18} {num_chunks} chunk(s)")
    return lines


def _other_checkpoints(root: Path, shown: Path) -> list[str]:
    from megatron.checkpoint import find_checkpoints

    tracked = read_tracker(root) if (root / TRACKER_FILENAME).is_file() else None
    lines = []
    for iteration, directory in find_checkpoints(root):
        marks = [
            word for word, flag in (("tracked", iteration == tracked), ("shown", directory == shown)) if flag
        ]
        lines.append(f"  iter {iteration:>9}  {directory}" + (f"  ({', '.join(marks)})" if marks else ""))
    return ["checkpoints under " + str(root) + ":", *lines] if lines else []


def cmd_info(args) -> int:
    directory = resolve_checkpoint(args.checkpoint, args.iteration)
    lines = describe(directory, list_tensors=args.tensors)
    root = Path(args.checkpoint)
    if root != directory:
        lines += _other_checkpoints(root, directory)
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------------
# verify


def _progress(args) -> bool | None:
    """The `enabled` of a progress bar: off with --no-progress, else only on a terminal."""
    return False if args.no_progress else None


def _verify_one(directory: Path, progress: bool | None = None) -> str | None:
    """None when `directory` verifies, else the problem."""
    from megatron.checkpoint.verify import verify_with_progress

    try:
        read_metadata(directory)  # also refuses a crafted .metadata before anything else reads it
        verify_with_progress(directory, enabled=progress, desc=f"verifying {directory.name}")
    except ValueError as error:
        return str(error)
    return None


def cmd_verify(args) -> int:
    if args.all:
        from megatron.checkpoint import find_checkpoints

        directories = [directory for _, directory in find_checkpoints(args.checkpoint)]
        if not directories:
            raise ValueError(f"{args.checkpoint}: no iter_* checkpoints there")
    else:
        directories = [resolve_checkpoint(args.checkpoint, args.iteration)]
    failures = 0
    for directory in directories:
        problem = _verify_one(directory, _progress(args))
        failures += problem is not None
        print(f"OK    {directory}" if problem is None else f"BAD   {directory}: {problem}", flush=True)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------
# consolidate


def _output_name(key: str, prefix: str) -> str:
    return key[len(prefix) :] if prefix else key


def safetensors_layout(entries, prefix: str, cast: torch.dtype | None):
    """(header dict without metadata, {key: (name, dtype, shape, begin, end)}) for the tensors of
    `entries`. Wider dtypes come first so every tensor starts at a multiple of its element size (the
    data section itself starts 8-aligned), as the safetensors library lays files out."""
    planned = []
    for index, (key, dtype, shape, _) in enumerate(entries):
        out_dtype = cast if cast is not None and dtype.is_floating_point else dtype
        if out_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} has no safetensors equivalent")
        planned.append((-out_dtype.itemsize, index, key, out_dtype, shape))
    header, slots, offset = {}, {}, 0
    for _, _, key, dtype, shape in sorted(planned):
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        name = _output_name(key, prefix)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        slots[key] = (name, dtype, shape, offset, offset + nbytes)
        offset += nbytes
    return header, slots


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian hosts, as safetensors stores them)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _stream_tensors(directory: Path, prefix: str):
    """(checkpoint key, tensor) one at a time, from the team's streaming reader."""
    from megatron.checkpoint import iter_tensors

    for name, tensor in iter_tensors(directory, prefix, verify=False):  # verified first (--skip-verify)
        yield (name if name.startswith(prefix) else prefix + name), tensor
        del tensor  # not held while the reader assembles the next one


def write_safetensors(
    directory: Path, output: Path, *, prefix: str, cast, metadata: dict, progress: bool | None = None
) -> tuple[int, int]:
    """Stream the tensors under `prefix` into `output` (atomically); returns (tensors, data bytes).
    `metadata` goes into the header's `__metadata__` (values as strings, dicts as JSON); `progress`: a
    bar over the tensor bytes (None: only on a terminal)."""
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; consolidate on a little-endian host")
    entries = tensor_entries(read_metadata(directory), prefix)
    if not entries:
        raise ValueError(f"{directory}: no tensors under --prefix {prefix!r}")
    header, slots = safetensors_layout(entries, prefix, cast)
    header["__metadata__"] = {"format": "pt"}  # what Hugging Face loaders expect in a safetensors header
    for key, value in metadata.items():
        header["__metadata__"][key] = (
            json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        )
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    data_start = 8 + len(blob)
    data_bytes = max((slot[4] for slot in slots.values()), default=0)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    written: set[str] = set()
    bar = progress_bar(total=data_bytes, desc="consolidating", unit="B", enabled=progress)
    try:
        with bar, open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)) + blob)
            handle.truncate(data_start + data_bytes)
            for key, tensor in _stream_tensors(directory, prefix):
                if key not in slots:
                    continue  # e.g. a key the metadata lists under another prefix: never expected
                name, dtype, shape, begin, end = slots[key]
                if tuple(tensor.shape) != tuple(shape):
                    raise ValueError(
                        f"{directory}: {key} read with shape {list(tensor.shape)}, metadata says {list(shape)}"
                    )
                handle.seek(data_start + begin)
                handle.write(_tensor_bytes(tensor.to(dtype)))
                bar.update(end - begin)
                written.add(key)
                del tensor  # one tensor in memory at a time
            missing = sorted(set(slots) - written)
            if missing:
                raise ValueError(f"{directory}: the reader returned no data for {missing[:5]}")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return len(slots), data_bytes


def _mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a memory-mapped (copy-on-write) tensor: nothing is read
    until used, and pages read are file-backed."""
    import numpy as np

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    by_name = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = by_name[info["dtype"]]
        if end == begin:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + length + begin, shape=(end - begin,))
        tensors[name] = torch.from_numpy(raw).view(dtype).reshape(info["shape"])
    return tensors


def write_pt(
    directory: Path, output: Path, *, prefix: str, cast, metadata: dict, progress: bool | None = None
) -> tuple[int, int]:
    """Like `write_safetensors`, then torch.save of the memory-mapped tensors: a dict loadable with
    torch.load(weights_only=True): {"tensors": {name: tensor}, **metadata} (plain values only)."""
    staging = output.with_name(f".{output.name}.staging{os.getpid()}.safetensors")
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        count, data_bytes = write_safetensors(
            directory, staging, prefix=prefix, cast=cast, metadata=metadata, progress=progress
        )
        payload = {**metadata, "tensors": _mapped_safetensors(staging)}
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        del payload
        os.replace(tmp, output)
    finally:
        staging.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return count, data_bytes


def cmd_consolidate(args) -> int:
    output = Path(args.output)
    suffix = output.suffix.lower()
    if suffix not in (".safetensors", ".pt"):
        raise ValueError(f"--output {output}: the name must end in .safetensors or .pt")
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: directory {output.parent} does not exist")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; name the file to write")
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {output} already exists; pass --overwrite to replace it")
    check_writable_directory(output.parent, f"--output {output}")
    directory = resolve_checkpoint(args.checkpoint, args.iteration)
    if not args.skip_verify:
        problem = _verify_one(directory, _progress(args))
        if problem is not None:
            raise VerificationError(f"{problem} (--skip-verify consolidates anyway)")
    from megatron.checkpoint import read_common

    common = read_common(directory)
    metadata = {
        "checkpoint_format": common.get("format"),
        "iteration": common.get("iteration"),
        "source": str(directory),
        "prefix": args.prefix,
        "config": common.get("config") or {},
    }
    writer = write_safetensors if suffix == ".safetensors" else write_pt
    cast = CAST_DTYPES[args.dtype] if args.dtype else None
    try:
        count, data_bytes = writer(
            directory, output, prefix=args.prefix, cast=cast, metadata=metadata, progress=_progress(args)
        )
    except OSError as error:  # the temporary files are gone (removed on the way out)
        where = error.filename or output
        raise ValueError(f"--output {output}: writing {where} failed: {os_error_text(error)}") from None
    print(f"wrote {output}: {count} tensors, {_human_bytes(data_bytes)} of tensor data (from {directory})")
    return 0


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint_util", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,verify,consolidate}")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("checkpoint", help="a --save directory or one iter_XXXXXXX directory")
        sub.add_argument(
            "--iteration",
            type=int,
            default=None,
            help="this iteration under a --save directory (default: tracked)",
        )
        sub.add_argument(
            "--no-progress", action="store_true", help="no progress bars (shown only on a terminal anyway)"
        )
        return sub

    info = add("info", "iteration, saving layout, model shape, tensor groups and sizes")
    info.add_argument("--tensors", action="store_true", help="also list every tensor (dtype, shape, chunks)")
    info.set_defaults(run=cmd_info)

    verify = add("verify", "check every file against the manifest (size and CRC32 or BLAKE2b checksum)")
    verify.add_argument(
        "--all", action="store_true", help="verify every iter_* checkpoint under the directory"
    )
    verify.set_defaults(run=cmd_verify)

    consolidate = add(
        "consolidate",
        "one .safetensors or .pt file of full (unsharded) tensors, streamed one tensor at a time "
        "(no layout conversion exists or is needed: any layout loads any checkpoint)",
    )
    consolidate.add_argument("--output", required=True, help="FILE.safetensors or FILE.pt")
    consolidate.add_argument(
        "--prefix",
        default="model/",
        help='keys to take; the prefix is cut from the names (default "model/": the weights; "" for all)',
    )
    consolidate.add_argument(
        "--dtype", choices=sorted(CAST_DTYPES), default=None, help="cast floating tensors (default: as saved)"
    )
    consolidate.add_argument("--skip-verify", action="store_true", help="do not check the manifest first")
    consolidate.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output file (refused otherwise)"
    )
    consolidate.set_defaults(run=cmd_consolidate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VerificationError as error:
        print(f"checkpoint_util {args.command}: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"checkpoint_util {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

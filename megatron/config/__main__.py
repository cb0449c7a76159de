"""Check a configuration without training: `python -m megatron.config --config tiny-cpu --data-path P ...`.

Validates exactly as `megatron.pretrain` does (same flags, WORLD_SIZE from the environment), then prints
the resolved configuration as YAML (loadable with --config) and the notes the training log would show.
"""

from __future__ import annotations

import sys

from megatron.config.cli import exit_with_error, parse_config
from megatron.launch import apply_launch


def main(argv: list[str] | None = None) -> int:
    """Parse and validate `argv` (exit status 2 on a user error), print the resolved YAML and notes."""
    try:
        apply_launch(require_rendezvous=False)  # under srun: WORLD_SIZE from SLURM_*, as megatron.pretrain
    except ValueError as error:
        exit_with_error(str(error), "python -m megatron.config")
    config = parse_config(argv, prog="python -m megatron.config")
    sys.stdout.write(config.to_yaml())
    for note in config.notes():
        sys.stdout.write(f"# note: {note}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preset configs shipped in the repository's configs/ directory, found by name."""

from __future__ import annotations

import difflib
from pathlib import Path

from megatron.config._fields import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


def preset_names() -> list[str]:
    """Names of the YAML presets in configs/ (file names without .yaml)."""
    if not PRESET_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """configs/NAME.yaml; ConfigError naming the presets when there is none."""
    path = PRESET_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if path.is_file():
        return path
    names = preset_names()
    match = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {match[0]}?" if match else ""
    raise ConfigError(
        f"--config {name}: no such file or preset (presets: {', '.join(names) or 'none'}){hint}"
    )


def resolve_config_path(value: str) -> Path:
    """A --config value: an existing file, else a preset name."""
    path = Path(value)
    if path.is_file():
        return path
    if len(path.parts) > 1:
        raise ConfigError(f"--config {value}: file does not exist")
    return preset_path(value)

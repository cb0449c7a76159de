"""Field helpers shared by the config dataclasses: per-field CLI metadata and user-facing errors."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration error the user caused (bad flag, bad YAML key or value, inconsistent settings)."""


def arg(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    flag: str | None = None,
    const_flags: dict[str, Any] | None = None,
    negatable: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field carrying what the CLI needs: help text, choices, flag name overrides.

    `const_flags` maps extra flags (e.g. "--openai-gelu") to the value they store in this field.
    `negatable` adds a `--no-FLAG` form for a boolean (as Megatron has for flags that default to True).
    `cli=False` keeps a field out of the CLI and YAML (derived values).
    """
    metadata = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "const_flags": const_flags or {},
        "negatable": negatable,
        "cli": cli,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(field_name: str) -> str:
    """The Megatron-style CLI flag for a field name (`num_layers` -> `--num-layers`)."""
    return "--" + field_name.replace("_", "-")


def show(field_name: str, value: Any) -> str:
    """`--flag value` as a user would write it, for error messages."""
    if isinstance(value, bool):
        return flag(field_name) if value else f"{flag(field_name)} (off)"
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return f"{flag(field_name)} {value}"


def require_positive(obj: Any, *names: str, allow_none: bool = False) -> None:
    """Raise ConfigError unless each named int/float attribute is > 0 (or None when allowed)."""
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if value is None:
            raise ConfigError(f"{flag(name)} is required (give it on the command line or in --config FILE)")
        if not 0 < value < math.inf:  # also false for nan
            raise ConfigError(
                f"{show(name, value)} must be {'' if _is_finite(value) else 'a finite number '}> 0"
            )


def require_range(obj: Any, name: str, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ConfigError unless low <= value <= high (or < high when high_open)."""
    value = getattr(obj, name)
    if value is None:
        return
    within = low <= value < high if high_open else low <= value <= high  # false for nan
    if not within:
        bracket = ")" if high_open else "]"
        valid = f"a finite number >= {low}" if high == math.inf else f"[{low}, {high}{bracket}"
        raise ConfigError(f"{show(name, value)} is out of range; valid: {valid}")


def require_choice(obj: Any, name: str, choices: tuple) -> None:
    """Raise ConfigError unless the attribute is one of `choices`."""
    value = getattr(obj, name)
    if value not in choices:
        valid = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{show(name, value)} is not a valid choice; valid: {valid}")


def _is_finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def float_fields(cls: type) -> list[str]:
    """Names of the fields of dataclass `cls` annotated `float` or `float | None`."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None)]


def require_finite(obj: Any) -> None:
    """Raise ConfigError naming the first float field of dataclass `obj` holding nan or +-inf (YAML `.nan`,
    `.inf`, or `nan`/`inf` on the command line): the net under every field's own range check, which
    runs first and names the range."""
    for name in float_fields(type(obj)):
        value = getattr(obj, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{show(name, value)} is not a finite number; give a finite value")

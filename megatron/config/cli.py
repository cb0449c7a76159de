"""Command line and YAML front end: Megatron-LM flag names generated from the config dataclasses.

Precedence: dataclass defaults < `--config` YAML files (in order) < command-line flags. YAML keys are
the flag names without the leading dashes, written with dashes or underscores, either flat or nested
under a section name (`model:`, `training:`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

from megatron.config._fields import ConfigError
from megatron.config.compat import NO_EFFECT_FLAGS
from megatron.config.config import SECTIONS, Config
from megatron.config.presets import resolve_config_path

NO_EFFECT = "no_effect"  # pseudo-section holding the compatibility flags


@dataclass(frozen=True)
class FlagSpec:
    """One accepted flag (name without dashes) and where its value goes.

    kind: "value" (one typed value), "list" (one or more strings), "bool" (sets True, or the YAML
    boolean), "const" (stores `const`, e.g. --openai-gelu or --no-FLAG).
    """

    name: str
    section: str
    field: str
    kind: str
    value_type: type = str
    optional: bool = True
    choices: tuple | None = None
    const: Any = None
    help: str = ""


def _int_value(text: str) -> int:
    """int, also from an integral float spelling ('2.5e5'), as YAML files often carry."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _float_value(text: str) -> float:
    """float; nan and inf pass here and are refused by validation with the flag's valid range, the same
    for `--lr nan` and YAML `lr: .nan` (`_fields.require_finite` is the net under every float field)."""
    return float(text)


_int_value.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
_float_value.__name__ = "float"
_CONVERTERS = {int: _int_value, float: _float_value, str: str}


def _unpack(hint: Any) -> tuple[type, bool, bool]:
    """(base type, is_list, optional) from an annotation like `int | None` or `list[str] | None`."""
    args = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else ()
    )
    optional = type(None) in args
    if args:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _help_with_default(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
        text += f" Default: {f.default}."
    return text.replace("%", "%%")


def _section_specs(section: str, cls: type) -> list[FlagSpec]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        base, is_list, optional = _unpack(hints[f.name])
        name = (f.metadata["flag"] or f.name.replace("_", "-")).lstrip("-")
        help_text = _help_with_default(f)
        kind = "bool" if base is bool else "list" if is_list else "value"
        specs.append(
            FlagSpec(name, section, f.name, kind, base, optional, f.metadata["choices"], help=help_text)
        )
        if base is bool and f.metadata["negatable"]:
            specs.append(
                FlagSpec("no-" + name, section, f.name, "const", const=False, help=f"Turn off --{name}.")
            )
        for extra, value in f.metadata["const_flags"].items():
            extra_help = f"Same as --{name} {value} (Megatron compatibility)."
            specs.append(FlagSpec(extra.lstrip("-"), section, f.name, "const", const=value, help=extra_help))
    return specs


def _no_effect_specs() -> list[FlagSpec]:
    specs = []
    for name, (takes_value, why) in NO_EFFECT_FLAGS.items():
        kind = "value" if takes_value else "bool"
        specs.append(
            FlagSpec(name, NO_EFFECT, name, kind, help=f"Accepted for compatibility; no effect: {why}.")
        )
    return specs


def flag_specs() -> dict[str, FlagSpec]:
    """Every accepted flag by lower-cased name (without dashes)."""
    specs = [s for name, cls in SECTIONS.items() for s in _section_specs(name, cls)] + _no_effect_specs()
    table = {}
    for spec in specs:
        assert spec.name.lower() not in table, f"duplicate flag --{spec.name}"
        table[spec.name.lower()] = spec
    return table


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _add_argument(group: argparse._ArgumentGroup, spec: FlagSpec) -> None:
    dest = f"{spec.section}.{spec.field}"
    kwargs: dict[str, Any] = {"dest": dest, "help": spec.help, "default": argparse.SUPPRESS}
    if spec.kind == "bool":
        kwargs.update(action="store_const", const=True)
    elif spec.kind == "const":
        kwargs.update(action="store_const", const=spec.const)
    else:
        metavar = None if spec.choices else "VALUE" if spec.section == NO_EFFECT else spec.field.upper()
        kwargs.update(type=_CONVERTERS[spec.value_type], choices=spec.choices, metavar=metavar)
        if spec.kind == "list":
            kwargs["nargs"] = "+"
    group.add_argument("--" + spec.name, **kwargs)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser with every flag, grouped per config section (defaults suppressed, so a
    parsed namespace holds only the flags actually given)."""
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [--config FILE_OR_PRESET ...] [--FLAG VALUE ...]",
        description="Megatron-style pretraining of StarCoder-class models. Flags use Megatron-LM's names.",
        epilog="Launch: one process as is; `torchrun --nproc-per-node N` on one node; one torchrun per node "
        "with --rdzv-backend c10d on several; under SLURM one torchrun per node or one `srun` task per GPU "
        "(ranks from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID, MASTER_ADDR exported by the batch "
        "script). Recipes with their requirements: examples/. Plan memory and time first with --dry-run.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE_OR_PRESET",
        help="YAML file (or preset name from configs/, e.g. tiny-cpu) with flag names as keys; "
        "repeatable, later files win; command-line flags override them.",
    )
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    groups[NO_EFFECT] = parser.add_argument_group(
        "compatibility", "Flags of Megatron-LM/BigCode launch scripts accepted with no effect (logged once)."
    )
    for spec in flag_specs().values():
        _add_argument(groups[spec.section], spec)
    return parser


def _suggest(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def _reject_unknown(unknown: list[str], parser: argparse.ArgumentParser) -> None:
    token = unknown[0]
    if not token.startswith("-"):
        raise ConfigError(f"unexpected argument '{token}' (flags take the form --name VALUE; see --help)")
    name = token.split("=", 1)[0]
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    suggestion = _suggest(name, options) or _suggest(name.replace("_", "-"), options)
    raise ConfigError(f"unrecognized argument {name}{suggestion or ' (see --help for the valid flags)'}")


def _cli_values(namespace: argparse.Namespace) -> dict[tuple[str, str], Any]:
    values = {}
    for dest, value in vars(namespace).items():
        if dest != "config":
            section, name = dest.split(".", 1)
            values[(section, name)] = value
    return values


def _yaml_error(path: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}': {message}")


def _flatten_yaml(data: Any, path: str) -> list[tuple[str, Any]]:
    """(key, value) pairs of a flat or section-nested YAML mapping."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    items = []
    for key, value in data.items():
        # `optimizer` is both a section and a flag: a mapping value makes it the section
        if (key in SECTIONS or key == NO_EFFECT) and isinstance(value, dict):
            items.extend(value.items())
        else:
            items.append((key, value))
    return items


def _convert_scalar(spec: FlagSpec, value: Any) -> Any:
    """A YAML scalar as the field's type; strings go through the CLI converter (PyYAML reads 1e-3 as str)."""
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"expected {spec.value_type.__name__}, got {value!r}")
    if spec.value_type is float and isinstance(value, (int, float)):
        return float(value)
    if spec.value_type is int and isinstance(value, int):
        return value
    if spec.value_type is str and isinstance(value, (int, float)):
        return str(value)
    try:
        return _CONVERTERS[spec.value_type](str(value))
    except ValueError:
        raise ValueError(f"expected {spec.value_type.__name__}, got {value!r}") from None


def _convert_yaml_value(spec: FlagSpec, value: Any) -> tuple[bool, Any]:
    """(set?, value) for one YAML entry; ValueError with a short reason when the type is wrong."""
    if spec.kind in ("bool", "const"):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        if spec.kind == "const":
            return value, spec.const  # `openai-gelu: false` leaves the field alone
        return True, value
    if value is None:
        if not spec.optional:
            raise ValueError("null is not allowed here")
        return True, None
    if spec.kind == "list":
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError(f"expected a list or a space-separated string, got {value!r}")
        return True, [str(v) for v in items]
    converted = _convert_scalar(spec, value)
    if spec.choices and converted not in spec.choices:
        raise ValueError(f"{converted!r} is not valid; valid: {', '.join(map(str, spec.choices))}")
    return True, converted


def _yaml_syntax_message(path: str, error) -> str:
    """`PATH:LINE:COLUMN: invalid YAML: PROBLEM (CONTEXT at LINE:COLUMN)`, 1-based as editors count."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"{path}: invalid YAML: {problem}"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text


def load_yaml_values(
    path: str | os.PathLike, specs: dict[str, FlagSpec] | None = None
) -> dict[tuple[str, str], Any]:
    """{(section, field): value} from a YAML config file; ConfigError naming the file and key."""
    import yaml

    specs = flag_specs() if specs is None else specs
    path = str(path)
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_syntax_message(path, error)) from None
    values = {}
    for key, value in _flatten_yaml(data, path):
        spec = specs.get(str(key).replace("_", "-").lower())
        if spec is None:
            names = [s.name for s in specs.values()]
            suggestion = _suggest(str(key).replace("_", "-"), names)
            raise _yaml_error(path, key, f"unknown key{suggestion or ' (keys are the flag names of --help)'}")
        try:
            should_set, converted = _convert_yaml_value(spec, value)
        except ValueError as error:
            raise _yaml_error(path, key, str(error)) from None
        if should_set:
            values[(spec.section, spec.field)] = converted
    return values


# Flags that together make one choice: a later source (a later --config file, then the command line)
# giving one of them replaces the earlier sources' choice instead of adding to it, so `--fp32` on the
# command line overrides a preset's `bf16: true`.
EXCLUSIVE_CHOICES = (("training", ("fp16", "bf16", "fp32")),)


def _without_overridden_choices(
    earlier: dict[tuple[str, str], Any], later: dict[tuple[str, str], Any]
) -> dict[tuple[str, str], Any]:
    """Drop from `earlier` (in place) the members of a choice that `later` sets; returns `later`."""
    for section, names in EXCLUSIVE_CHOICES:
        if any(later.get((section, name)) for name in names):
            for name in names:
                earlier.pop((section, name), None)
    return later


def _build_config(values: dict[tuple[str, str], Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    no_effect = {}
    for (section, name), value in values.items():
        if section == NO_EFFECT:
            no_effect[name] = value
        else:
            sections[section][name] = value
    config = Config(**{name: cls(**sections[name]) for name, cls in SECTIONS.items()})
    config.no_effect_flags = no_effect
    return config


def load_config(
    argv: list[str] | None = None,
    *,
    world_size: int | None = None,
    check_paths: bool = True,
    prog: str | None = None,
) -> Config:
    """Parse flags (and --config YAML files) into a validated Config; raises ConfigError (a ValueError).

    argv: default sys.argv[1:]. world_size: default the WORLD_SIZE environment variable (1 if unset).
    check_paths: require the data and tokenizer inputs and check that they exist. prog: the program
    name in --help (default: from sys.argv[0]).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(unknown, parser)
    specs = flag_specs()
    values: dict[tuple[str, str], Any] = {}
    for config_file in namespace.config:
        values.update(
            _without_overridden_choices(values, load_yaml_values(resolve_config_path(config_file), specs))
        )
    values.update(_without_overridden_choices(values, _cli_values(namespace)))
    return _build_config(values).validate(world_size=world_size, check_paths=check_paths)


def exit_with_error(message: str, prog: str | None = None) -> typing.NoReturn:
    """Print `PROG: error: MESSAGE` on stderr (argparse style, one line) and exit with status 2."""
    prog = prog or os.path.basename(sys.argv[0])
    if not prog or prog.startswith("-"):  # `python -c` gives "-c"
        prog = "megatron"
    one_line = " ".join(message.split("\n"))
    sys.stderr.write(f"{prog}: error: {one_line}\n")
    raise SystemExit(2)


def parse_config(
    argv: list[str] | None = None,
    *,
    world_size: int | None = None,
    check_paths: bool = True,
    prog: str | None = None,
) -> Config:
    """Like load_config, but a user error prints one `error:` line on stderr and exits with status 2."""
    try:
        return load_config(argv, world_size=world_size, check_paths=check_paths, prog=prog)
    except ConfigError as error:
        exit_with_error(str(error), prog)

"""Property tests (hypothesis) of the YAML/flag front end, generated from the flag table itself.

- The same settings given as flags or as a YAML file give the same outcome: the same Config, or a
  ConfigError from both; never another exception type.
- A valid config written by `Config.to_yaml` (what `python -m megatron.config` prints) reads back as the
  same config.
- A value that is refused is refused with a ConfigError naming the flag that was set.
"""

from __future__ import annotations

import dataclasses
import math
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.config import SECTIONS, ConfigError, load_config
from megatron.config.cli import NO_EFFECT, flag_specs
from megatron.config.data import weights_and_prefixes

# A small valid run the generated settings are laid over (model shape, batch, schedule).
BASE = {
    "num-layers": 2,
    "hidden-size": 64,
    "num-attention-heads": 4,
    "seq-length": 32,
    "max-position-embeddings": 64,
    "micro-batch-size": 2,
    "global-batch-size": 4,
    "lr": 0.001,
    "train-iters": 10,
}
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SPECS = {
    spec.name: spec
    for spec in flag_specs().values()
    if spec.section != NO_EFFECT and spec.kind in ("value", "list", "bool")
}
_DEFAULTS = {
    spec.name: field.default
    for spec in SPECS.values()
    for field in dataclasses.fields(SECTIONS[spec.section])
    if field.name == spec.field
}
# words that read back as themselves on a command line and in YAML (no leading dash: that is a flag)
_WORD = st.text(string.ascii_letters + string.digits + "/._:", min_size=1, max_size=10).filter(
    lambda text: not text.startswith("-")
)
_SPECIAL_FLOATS = st.sampled_from([0.0, -1.0, 1.0, 1e-8, 1e300, math.nan, math.inf, -math.inf])
# number spellings a word-valued flag (--split, --data-path weights, --iterations-to-skip) may parse
_NUMBER_WORDS = st.sampled_from(["nan", "inf", "1e400", "0", "1.5", "969,30,1", "1,nan", "2,inf,1"])


def _value_strategy(name: str, *, sensible: bool) -> st.SearchStrategy:
    """Values for flag `name`: mostly valid-looking ones when `sensible`, anything of the type else."""
    spec, default = SPECS[name], _DEFAULTS[name]
    if spec.kind == "bool":
        return st.booleans() if default is True else st.just(True)
    words = _WORD if sensible else st.one_of(_WORD, _NUMBER_WORDS)
    if spec.kind == "list":
        return st.lists(words, min_size=1, max_size=4)
    if spec.choices:
        return st.sampled_from(spec.choices) if sensible else st.one_of(st.sampled_from(spec.choices), _WORD)
    keep = [st.just(default)] if default is not None else []
    if spec.value_type is int:
        wild = st.integers(-(2**40), 2**40)
        return (
            st.one_of(*keep, st.integers(1, 64)) if sensible else st.one_of(*keep, wild, st.integers(-2, 2))
        )
    if spec.value_type is float:
        small = st.floats(0.0, 1.0, exclude_min=True)
        return st.one_of(*keep, small) if sensible else st.one_of(*keep, small, _SPECIAL_FLOATS, st.floats())
    return st.one_of(*keep, words) if keep else words


def _settings(*, sensible: bool, max_size: int) -> st.SearchStrategy:
    names = st.lists(st.sampled_from(sorted(SPECS)), min_size=1, max_size=max_size, unique=True)
    return names.flatmap(
        lambda chosen: st.fixed_dictionaries({n: _value_strategy(n, sensible=sensible) for n in chosen})
    )


def _argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        spec = SPECS[name]
        if spec.kind == "bool":
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif spec.kind == "list":
            argv += [f"--{name}", *value]
        else:
            argv.append(f"--{name}={value}")  # `=`: a value such as -inf is not read as a flag
    return argv


def _outcome(load):
    """('ok', the config's sections) or ('error', message); any other exception propagates."""
    try:
        config = load()
    except ConfigError as error:
        return "error", str(error)
    return "ok", config.to_dict()


def _load_cli(values: dict):
    return load_config(_argv({**BASE, **values}), world_size=1, check_paths=False)


def _load_yaml(tmp_path, values: dict):
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump({**BASE, **values}, sort_keys=False))
    return load_config(["--config", str(path)], world_size=1, check_paths=False)


def _names_the_flag(message: str, names: list[str]) -> bool:
    return any(f"--{name}" in message or f"'{name}'" in message for name in names)


@SETTINGS
@given(values=_settings(sensible=True, max_size=4))
def test_flags_and_yaml_give_the_same_config(tmp_path, values):
    from_cli, from_yaml = _outcome(lambda: _load_cli(values)), _outcome(lambda: _load_yaml(tmp_path, values))
    assert from_cli[0] == from_yaml[0], (from_cli, from_yaml)
    if from_cli[0] == "ok":
        assert from_cli == from_yaml
    else:
        assert _names_the_flag(from_cli[1], list(values)), from_cli[1]


@SETTINGS
@given(values=_settings(sensible=True, max_size=3))
def test_to_yaml_reads_back_as_the_same_config(tmp_path, values):
    try:
        config = _load_cli(values)
    except ConfigError:
        return  # the first property covers refusals
    path = tmp_path / "dumped.yaml"
    path.write_text(config.to_yaml())
    again = load_config(["--config", str(path)], world_size=1, check_paths=False)
    assert again.to_dict() == config.to_dict()
    assert path.read_text() == again.to_yaml()


@SETTINGS
@given(values=_settings(sensible=False, max_size=2))
def test_any_value_is_accepted_or_refused_with_a_config_error_naming_it(tmp_path, values):
    """Wild values (huge, negative, nan/inf, words for numbers): a ConfigError naming one of the flags
    set, from the command line and from YAML alike; an accepted config holds only finite floats."""
    for load in (lambda: _load_cli(values), lambda: _load_yaml(tmp_path, values)):
        kind, result = _outcome(load)
        if kind == "error":
            assert _names_the_flag(result, list(values)), (values, result)
        else:
            assert all(math.isfinite(v) for v in _numbers(result)), (values, result)


def _numbers(sections: dict) -> list[float]:
    """Every number an accepted config holds: the float options, the --split proportions and the
    --data-path weights."""
    numbers = [v for section in sections.values() for v in section.values() if isinstance(v, float)]
    data = sections["data"]
    numbers += [float(part) for part in data["split"].replace("/", ",").split(",") if part.strip()]
    numbers += [weight for weight, _ in weights_and_prefixes(data["data_path"])]
    return numbers


@pytest.mark.parametrize("name", sorted(n for n, s in SPECS.items() if s.value_type is float))
def test_each_float_flag_refuses_nan_from_both_sources(tmp_path, name):
    """The deterministic corner of the properties above, one flag at a time."""
    from_cli = _outcome(lambda: _load_cli({name: math.nan}))
    from_yaml = _outcome(lambda: _load_yaml(tmp_path, {name: math.nan}))
    assert from_cli[0] == from_yaml[0] == "error"
    assert from_cli[1] == from_yaml[1] and f"--{name} nan" in from_cli[1]

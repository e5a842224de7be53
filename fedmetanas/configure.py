"""A run's configuration as the registered algorithms shape it: the core sections (`fedmetanas.config`)
plus each algorithm's own, checked and kept only for the algorithm that runs.

`fedmetanas.config` holds the core sections and how YAML becomes a Config; the registry
(`fedmetanas.algorithms`) holds the algorithms, which read the Config. This module imports both and
joins them, so neither imports the other: data flows config -> set-up -> loop -> algorithm.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from fedmetanas.algorithms import ALGORITHMS, declared_sections
from fedmetanas.config import Config, ConfigError, all_sections, build_config, read_config_file


def section_classes() -> dict[str, type]:
    """Every top-level config section a YAML file may hold (the core ones and every registered
    algorithm's), in the order of a resolved config file."""
    return all_sections(declared_sections())


def _active_algorithm(cfg: Config) -> Config:
    """`cfg` keeping only the sections of the algorithm `algorithm.name` names, checked by that algorithm."""
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        names = list(ALGORITHMS)
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"algorithm.name: {name!r} is not valid; use one of "
                          f"{', '.join(repr(n) for n in names)}{extra}")
    cls = ALGORITHMS[name]
    cfg = dataclasses.replace(cfg, sections={k: cfg.sections[k] for k in cls.sections})
    cls.validate(cfg)  # checks across its sections and the model's
    return cfg


def config_from_dict(data: dict[str, Any] | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated Config from a mapping (as read from YAML) plus `a.b=value` overrides.

    Every registered algorithm's section is accepted and checked (a typo in one fails at once); the
    Config keeps the active algorithm's only.
    """
    return build_config(data, overrides, declared_sections(), _active_algorithm)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file (or only defaults when `path` is None) and apply overrides."""
    return config_from_dict(read_config_file(path), overrides)


def default_config() -> Config:
    """The default run: every field at its default, with the default algorithm's sections."""
    return config_from_dict(None)

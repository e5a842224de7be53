"""The pip pins (requirements.txt) and the conda environment (environment.yml) list the same packages
at the same versions, so both kinds of user get the same stack."""

from __future__ import annotations

import re

import yaml

from tests.helpers import REPO

# conda-forge names of the PyPI packages where they differ.
CONDA_NAME = {"torch": "pytorch", "pyyaml": "pyyaml"}


def _pip_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line).groups()
            pins[CONDA_NAME.get(name.lower(), name.lower())] = version
    return pins


def _conda_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pins = {}
    for dep in env["dependencies"]:
        name, version = dep.split("=", 1)
        if name != "python":
            pins[name.lower()] = version
    return pins


def test_every_requirement_is_pinned_exactly_and_matches_environment_yml() -> None:
    assert _pip_pins() == _conda_pins()


def test_the_pins_include_the_design_card_packages() -> None:
    pins = _pip_pins()
    for name in ("pytorch", "torchvision", "mpi4py", "numpy", "h5py", "pyyaml"):
        assert name in pins
    assert pins["pytorch"] == "2.14.1" and pins["torchvision"] == "0.29.1"

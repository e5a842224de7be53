"""The algorithm registry: `algorithm.name` -> Algorithm class, and the config sections they declare.

Adding an algorithm is one file in this package and one line in `_REGISTERED` (docs/extending.md).
"""

from __future__ import annotations

from fedmetanas.algorithms.base import Algorithm
from fedmetanas.algorithms.fedavg import FedAvg
from fedmetanas.algorithms.fedmetanas import FedMetaNASAlgorithm
from fedmetanas.algorithms.fednas import FedNAS
from fedmetanas.algorithms.fedprox import FedProx
from fedmetanas.algorithms.perfedavg import PerFedAvg
from fedmetanas.algorithms.scaffold import Scaffold

_REGISTERED: tuple[type[Algorithm], ...] = (FedMetaNASAlgorithm, FedNAS, FedAvg, PerFedAvg, FedProx, Scaffold)

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in _REGISTERED}


def declared_sections() -> dict[str, type]:
    """Every config section a registered algorithm declares (YAML key -> frozen dataclass), once, in
    registration order. Derived from `ALGORITHMS` when asked, so the two never disagree."""
    return {k: v for cls in ALGORITHMS.values() for k, v in cls.sections.items()}


def get_algorithm(name: str) -> type[Algorithm]:
    """The class registered as `name` (config validation has already checked it exists)."""
    return ALGORITHMS[name]

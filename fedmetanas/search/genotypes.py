"""Primitive sets and the `Genotype` record of a discrete cell architecture."""

from __future__ import annotations

import ast
from typing import NamedTuple

# DARTS (Liu et al. 2019): the 8 candidate ops including `none`.
DARTS_PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)

# MetaNAS (Elsken et al. 2020): its 7 few-shot ops, no `none`.
METANAS_PRIMITIVES: tuple[str, ...] = (
    "max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1",
    "conv_3x3", "sep_conv_3x3", "dil_conv_3x3",
)

PRIMITIVE_SETS: dict[str, tuple[str, ...]] = {"darts": DARTS_PRIMITIVES, "metanas": METANAS_PRIMITIVES}


def resolve_primitives(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """A named primitive set or an explicit tuple of op names."""
    return PRIMITIVE_SETS[spec] if isinstance(spec, str) else tuple(spec)


Edge = tuple[str, int]  # (op name, index of the input state: 0, 1 = cell inputs, 2.. = nodes)


class Genotype(NamedTuple):
    """A discrete cell pair, DARTS-compatible: per node, its list of (op, input) edges."""

    normal: list[list[Edge]]
    normal_concat: list[int]
    reduce: list[list[Edge]]
    reduce_concat: list[int]

    def to_string(self) -> str:
        """A one-line, round-trippable text form (stored in logs and checkpoints)."""
        return repr({k: getattr(self, k) for k in self._fields})

    @classmethod
    def from_string(cls, text: str) -> "Genotype":
        """Inverse of `to_string`."""
        raw = ast.literal_eval(text)
        return cls(
            normal=[[(str(o), int(i)) for o, i in node] for node in raw["normal"]],
            normal_concat=[int(i) for i in raw["normal_concat"]],
            reduce=[[(str(o), int(i)) for o, i in node] for node in raw["reduce"]],
            reduce_concat=[int(i) for i in raw["reduce_concat"]],
        )


# DARTS's published second-order cell, for fixed-architecture baselines (nodes=4).
DARTS_V2 = Genotype(
    normal=[[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)], [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)],
            [("sep_conv_3x3", 1), ("skip_connect", 0)], [("skip_connect", 0), ("dil_conv_3x3", 2)]],
    normal_concat=[2, 3, 4, 5],
    reduce=[[("max_pool_3x3", 0), ("max_pool_3x3", 1)], [("skip_connect", 2), ("max_pool_3x3", 1)],
            [("max_pool_3x3", 0), ("skip_connect", 2)], [("skip_connect", 2), ("max_pool_3x3", 1)]],
    reduce_concat=[2, 3, 4, 5],
)

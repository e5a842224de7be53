"""Primitive sets and the `Genotype` record of a discrete cell architecture."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Collection
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
CELL_KINDS: tuple[str, ...] = ("normal", "reduce")


def default_reduction_layers(layers: int) -> tuple[int, ...]:
    """DARTS's placement of the reduction cells: at a third and two thirds of the depth."""
    return tuple(sorted({layers // 3, 2 * layers // 3})) if layers >= 2 else ()


def cell_kinds(layers: int, reduction_layers: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """The cell kinds a network of `layers` cells has: one layer (or none reducing) has no reduce cell."""
    reducing = default_reduction_layers(layers) if reduction_layers is None else reduction_layers
    kinds = {"reduce" if layer in reducing else "normal" for layer in range(layers)}
    return tuple(k for k in CELL_KINDS if k in kinds)


class Genotype(NamedTuple):
    """A discrete cell pair, DARTS-compatible: per node, its list of (op, input) edges.

    A kind of cell the network does not have (a 1-layer net has no reduce cell) is empty: `[]`, and
    left out of the text form, so a genotype never reports a cell decoded from untrained logits."""

    normal: list[list[Edge]]
    normal_concat: list[int]
    reduce: list[list[Edge]]
    reduce_concat: list[int]

    @property
    def cells(self) -> tuple[str, ...]:
        """The cell kinds this genotype holds ("normal", "reduce")."""
        return tuple(k for k in CELL_KINDS if getattr(self, k))

    def to_string(self) -> str:
        """A one-line, round-trippable text form (stored in logs and checkpoints) of the cells it holds."""
        return repr({k: getattr(self, k) for k in self._fields if getattr(self, k.removesuffix("_concat"))})

    @classmethod
    def from_string(cls, text: str) -> "Genotype":
        """Inverse of `to_string` (a cell left out is empty).

        Raises:
            ValueError, SyntaxError, TypeError: `text` is not a genotype's text form.
        """
        raw = ast.literal_eval(text)
        if not isinstance(raw, dict) or not raw or not set(raw) <= set(cls._fields):
            raise ValueError(f"a genotype is a dict with keys {', '.join(cls._fields)}")
        cells = {k: [[(str(o), int(i)) for o, i in node] for node in raw.get(k, [])] for k in CELL_KINDS}
        concat = {f"{k}_concat": [int(i) for i in raw.get(f"{k}_concat", [])] for k in CELL_KINDS}
        return cls(**cells, **concat)


def validate_genotype(genotype: Genotype, ops: Collection[str]) -> None:
    """Check that `genotype` can be built: known ops (never `none`), inputs and outputs that exist.

    Node j of a cell (0-based) may take the cell's two inputs (0, 1) and the nodes before it (2..j+1).

    Raises:
        ValueError: naming the cell, node and value that is wrong.
    """
    if not genotype.cells:
        raise ValueError("the genotype has no cell")
    for kind in CELL_KINDS:
        gene, concat = getattr(genotype, kind), getattr(genotype, f"{kind}_concat")
        if not gene:
            if concat:
                raise ValueError(f"{kind}_concat is given but the {kind} cell has no nodes")
            continue
        for j, node in enumerate(gene):
            if not node:
                raise ValueError(f"node {j} of the {kind} cell has no incoming edge")
            for op, i in node:
                if op not in ops or op == "none":
                    hint = difflib.get_close_matches(op, [o for o in ops if o != "none"], n=1)
                    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise ValueError(f"node {j} of the {kind} cell: unknown op {op!r}{extra}; known: "
                                     f"{', '.join(o for o in ops if o != 'none')}")
                if not 0 <= i < j + 2:
                    raise ValueError(f"node {j} of the {kind} cell: input {i} out of range (node {j} takes "
                                     f"inputs 0..{j + 1}: the two cell inputs and the nodes before it)")
        bad = [c for c in concat if not 2 <= c < len(gene) + 2]
        if not concat or bad:
            raise ValueError(f"{kind}_concat {concat}: needs node outputs in 2..{len(gene) + 1} "
                             f"(the {kind} cell has {len(gene)} nodes)")
    if len(genotype.cells) == 2 and len(genotype.normal) != len(genotype.reduce):
        raise ValueError(f"the normal cell has {len(genotype.normal)} nodes but the reduce cell "
                         f"{len(genotype.reduce)}; give both the same number")


# DARTS's published second-order cell, for fixed-architecture baselines (nodes=4).
DARTS_V2 = Genotype(
    normal=[[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)], [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)],
            [("sep_conv_3x3", 1), ("skip_connect", 0)], [("skip_connect", 0), ("dil_conv_3x3", 2)]],
    normal_concat=[2, 3, 4, 5],
    reduce=[[("max_pool_3x3", 0), ("max_pool_3x3", 1)], [("skip_connect", 2), ("max_pool_3x3", 1)],
            [("max_pool_3x3", 0), ("skip_connect", 2)], [("skip_connect", 2), ("max_pool_3x3", 1)]],
    reduce_concat=[2, 3, 4, 5],
)

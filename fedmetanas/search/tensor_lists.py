"""The parameter interface both learners use — `weights()`, `alphas()`, `param_list()`, `buffer_list()` —
shared by the supernet and the fixed-architecture networks.

Walking hundreds of submodules costs more than a small step on a CPU (measured: ~40% of a local
update), so the flat lists are built once and rebuilt after `.to()` / `_apply`. Other values derived from
the module's structure (the stacked step's plan) are kept with `derived` and forgotten, with the lists, by
`structure_changed`, which whoever swaps submodules in place calls (`search.norms`).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class TensorListsModule(nn.Module):
    """An `nn.Module` whose parameters split into weights and architecture parameters (`_is_alpha`)."""

    @staticmethod
    def _is_alpha(name: str) -> bool:
        """Whether the parameter called `name` is an architecture parameter (none here)."""
        return False

    def _tensor_lists(self) -> dict[str, list[torch.Tensor]]:
        cache = self.__dict__.get("_lists")
        if cache is None:
            named = list(self.named_parameters())
            cache = {"weights": [p for n, p in named if not self._is_alpha(n)],
                     "alphas": [p for n, p in named if self._is_alpha(n)],
                     "params": [p for _, p in named], "buffers": list(self.buffers())}
            self.__dict__["_lists"] = cache
        return cache

    def derived(self, key: str, build: Callable[[], T]) -> T:
        """A value derived from the module's structure (submodules, parameter names and shapes, no tensors),
        built by `build()` on first use and kept until `structure_changed`; it survives `.to()`."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def structure_changed(self) -> None:
        """Forget the tensor lists and every `derived` value: call after replacing submodules in place."""
        self.__dict__.pop("_lists", None)
        self.__dict__.pop("_derived", None)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.__dict__.pop("_lists", None)
        return super()._apply(fn, recurse)

    def alphas(self) -> list[nn.Parameter]:
        """The architecture parameters."""
        return self._tensor_lists()["alphas"]

    def weights(self) -> list[nn.Parameter]:
        """The network weights (everything trainable that is not an architecture parameter)."""
        return self._tensor_lists()["weights"]

    def param_list(self) -> list[nn.Parameter]:
        """All parameters, in `parameters()` order."""
        return self._tensor_lists()["params"]

    def buffer_list(self) -> list[torch.Tensor]:
        """All buffers (BN statistics, constants), in `buffers()` order."""
        return self._tensor_lists()["buffers"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_list():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

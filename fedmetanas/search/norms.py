"""Which normalization the networks use: DARTS's BatchNorm, or GroupNorm (`model.norm`).

BatchNorm normalizes with the statistics of the batch, and at test time with running averages of them.
Under label skew both go wrong in federated learning: a client holding one or two classes trains on batch
statistics of those classes only, and the averaged running statistics describe no client's data
(Hsieh et al., ICML 2020, "The Non-IID Data Quagmire", replace BN with GroupNorm for this reason).
GroupNorm (Wu & He, 2018) normalizes each sample over groups of channels: no batch statistics, no running
buffers, the same computation in training and evaluation, on every client. What it costs is measured on
the grid (docs/results.md, "Against today's FedNAS"); BatchNorm stays the default.

The networks are built with BatchNorm and converted here, module for module: a GroupNorm keeps the
BatchNorm's channel count and `affine` (DARTS's affine-free norm in the search cell, affine in the stem and
in networks trained from scratch), so parameter names, shapes and the seeded initialization are unchanged.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from fedmetanas.search.tensor_lists import TensorListsModule

NormKind = Literal["batch", "group"]


def to_group_norm(net: nn.Module, groups: int) -> nn.Module:
    """Replace every `nn.BatchNorm2d` in `net` (in place) by `nn.GroupNorm(groups, channels)` with the same
    `affine` and eps; `net` is returned. Raises ValueError where `groups` does not divide a layer's channels."""
    for name, mod in list(net.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                c = child.num_features
                if c % groups:
                    where = f"{name}.{child_name}" if name else child_name
                    raise ValueError(f"group norm: {groups} groups do not divide the {c} channels of {where}")
                setattr(mod, child_name, nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine))
        if isinstance(mod, TensorListsModule):  # its lists and plan name the old modules' tensors
            mod.structure_changed()
    return net


def apply_norm(net: nn.Module, kind: NormKind, groups: int) -> nn.Module:
    """`net` with the normalization `kind` (`batch`: as built)."""
    return to_group_norm(net, groups) if kind == "group" else net

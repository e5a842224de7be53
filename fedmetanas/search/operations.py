"""Candidate operations of the cell search space, as an `OPS` table of constructors.

Every constructor takes (channels, stride, affine) and returns a module mapping C channels at HxW
to C channels at H/stride x W/stride. In the supernet BatchNorm is affine-free as in DARTS's search
phase, so the only scale on an op's output is its architecture weight; a network trained from scratch
on a fixed genotype (FedNAS's retraining, FedAvg) uses affine BN and no BN after pooling, as DARTS's
evaluation network does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv -> BN, the DARTS building block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 affine: bool = False) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 dilation: int, affine: bool = False) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convs (the first carries the stride), as in DARTS."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 affine: bool = False) -> None:
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine),
        )


class FacConv(nn.Sequential):
    """ReLU -> 1xk conv -> kx1 conv -> BN (MetaNAS's factorized conv)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 affine: bool = False) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, (1, kernel), (1, stride), (0, padding), bias=False),
            nn.Conv2d(c_in, c_out, (kernel, 1), (stride, 1), (padding, 0), bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Zero(nn.Module):
    """The `none` op: a zero tensor of the output shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x * 0.0
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs, keeping every pixel in play."""

    def __init__(self, c_in: int, c_out: int, affine: bool = False) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # Pad odd sizes so both branches see the same output resolution.
        shifted = nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def _pool(kind: str, c: int, stride: int, affine: bool) -> nn.Module:
    pool = (nn.MaxPool2d(3, stride, padding=1) if kind == "max"
            else nn.AvgPool2d(3, stride, padding=1, count_include_pad=False))
    if affine:
        return pool  # DARTS's evaluation network: a bare pooling op
    # DARTS's search cell follows pooling with an affine-free BN so its scale matches the convs.
    return nn.Sequential(pool, nn.BatchNorm2d(c, affine=False))


def _skip(c: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)


OPS: dict[str, Callable[..., nn.Module]] = {
    "none": lambda c, s, affine=False: Zero(s),
    "max_pool_3x3": lambda c, s, affine=False: _pool("max", c, s, affine),
    "avg_pool_3x3": lambda c, s, affine=False: _pool("avg", c, s, affine),
    "skip_connect": lambda c, s, affine=False: _skip(c, s, affine),
    "sep_conv_3x3": lambda c, s, affine=False: SepConv(c, c, 3, s, 1, affine),
    "sep_conv_5x5": lambda c, s, affine=False: SepConv(c, c, 5, s, 2, affine),
    "dil_conv_3x3": lambda c, s, affine=False: DilConv(c, c, 3, s, 2, 2, affine),
    "dil_conv_5x5": lambda c, s, affine=False: DilConv(c, c, 5, s, 4, 2, affine),
    "conv_3x3": lambda c, s, affine=False: ReLUConvBN(c, c, 3, s, 1, affine),
    "conv_1x5_5x1": lambda c, s, affine=False: FacConv(c, c, 5, s, 2, affine),
}

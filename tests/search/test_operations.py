"""Candidate ops: every entry of OPS maps C x H x W to C x ceil(H/stride) x ceil(W/stride)."""

import math

import pytest
import torch

from fedmetanas.search.operations import OPS, FactorizedReduce

C = 4


def _input(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, C, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("size", [7, 8])
def test_every_op_keeps_the_shape_at_stride_1(name, size):
    # Prepare
    op = OPS[name](C, 1)
    x = _input(size)

    # Execute
    y = op(x)

    # Assert
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("size", [7, 8])
def test_every_op_halves_the_resolution_rounding_up_at_stride_2(name, size):
    op = OPS[name](C, 2)
    x = _input(size)

    y = op(x)

    half = math.ceil(size / 2)
    assert y.shape == (2, C, half, half)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_none_op_outputs_exact_zeros(stride):
    x = _input(8)

    y = OPS["none"](C, stride)(x)

    assert y.shape[1] == C
    assert torch.equal(y, torch.zeros_like(y))


def test_factorized_reduce_on_odd_sizes_gives_ceil_half():
    op = FactorizedReduce(C, 6)

    y = op(_input(9))

    assert y.shape == (2, 6, 5, 5)


def test_factorized_reduce_halves_see_even_and_odd_pixels_respectively():
    # In eval mode the affine-free BN is per channel, so each half only depends on its own branch:
    # conv1 reads pixels (2i, 2j), conv2 the pixels shifted by one, (2i+1, 2j+1).
    op = FactorizedReduce(C, C).eval()
    x = _input(8).abs()  # positive, so the ReLU passes perturbations through
    base = op(x)
    even, odd = x.clone(), x.clone()
    even[:, :, 0, 0] += 1.0
    odd[:, :, 1, 1] += 1.0

    d_even = (op(even) - base)[:, :, 0, 0].abs()
    d_odd = (op(odd) - base)[:, :, 0, 0].abs()

    half = C // 2
    assert (d_even[:, :half] > 0).any() and torch.equal(d_even[:, half:], torch.zeros_like(d_even[:, half:]))
    assert (d_odd[:, half:] > 0).any() and torch.equal(d_odd[:, :half], torch.zeros_like(d_odd[:, :half]))


def test_factorized_reduce_rejects_odd_channel_counts():
    with pytest.raises(ValueError, match="even channel count"):
        FactorizedReduce(C, 5)

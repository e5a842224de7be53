"""Test-set evaluation returns sums, so shards evaluated on different ranks add up exactly."""

import torch

from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.evaluation import evaluate, shard

MEAN, STD = (0.4,), (0.2,)


def _split(n: int = 37) -> TensorSplit:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return TensorSplit(images, labels, MEAN, STD, num_classes=3)


W = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) @ W


def _reference(split: TensorSplit, idx: torch.Tensor) -> tuple[float, int]:
    """Normalise by hand, classify all rows at once."""
    x = (split.images[idx].double() / 255.0 - MEAN[0]) / STD[0]
    logits = x.flatten(1) @ W.double()
    y = split.labels[idx]
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    return float(ce), int((logits.argmax(dim=1) == y).sum())


def test_evaluate_counts_correct_predictions_and_sums_the_loss():
    split = _split()
    idx = torch.tensor([5, 0, 36, 12, 12, 7, 20, 3, 9, 30, 31])

    out = evaluate(_linear, split, idx, batch_size=4)

    ce, correct = _reference(split, idx)
    assert out.dtype == torch.float64 and out.shape == (3,)
    assert int(out[1]) == correct
    assert int(out[2]) == idx.numel()
    assert abs(float(out[0]) - ce) < 1e-4 * max(1.0, ce)
    assert 0 < correct < idx.numel()  # the check is not vacuous


def test_evaluate_is_independent_of_batch_size_and_memory_format():
    split, idx = _split(), torch.arange(37)

    a = evaluate(_linear, split, idx, batch_size=5)
    b = evaluate(_linear, split, idx, batch_size=37, channels_last=True)

    assert a[1:].tolist() == b[1:].tolist()
    assert torch.allclose(a[0], b[0], rtol=1e-5)


def test_shards_over_three_ranks_partition_the_indices():
    idx = torch.arange(100, 137)

    parts = [shard(idx, r, 3) for r in range(3)]

    assert torch.equal(torch.cat(parts), idx)
    assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1


def test_summed_shards_equal_the_unsharded_evaluation():
    split = _split()
    idx = torch.randperm(37, generator=torch.Generator().manual_seed(2))

    whole = evaluate(_linear, split, idx, batch_size=6)
    summed = sum(evaluate(_linear, split, shard(idx, r, 3), batch_size=6) for r in range(3))

    assert summed[1:].tolist() == whole[1:].tolist()
    assert torch.allclose(summed[0], whole[0], rtol=1e-6)


def test_more_ranks_than_indices_leaves_some_shards_empty():
    split, idx = _split(), torch.tensor([1, 2])

    outs = [evaluate(_linear, split, shard(idx, r, 4), batch_size=3) for r in range(4)]

    assert [int(o[2]) for o in outs] == [0, 1, 0, 1]
    whole = evaluate(_linear, split, idx, batch_size=3)
    assert sum(outs)[1:].tolist() == whole[1:].tolist()
    assert torch.allclose(sum(outs)[0], whole[0], rtol=1e-6)

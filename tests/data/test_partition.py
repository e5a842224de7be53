"""Properties of the client partitions: coverage, skew, determinism, and errors naming config fields."""

import numpy as np
import pytest

from fedmetanas.data.partition import (
    class_counts,
    dirichlet,
    iid,
    largest_min_samples,
    make_partition,
    partition_hash,
    shards,
    split_local,
)

NUM_CLASSES = 10


def _labels(n: int = 2000, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=n)


def _balanced_labels(per_class: int = 100) -> np.ndarray:
    return np.repeat(np.arange(NUM_CLASSES), per_class)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = class_counts(labels, parts, NUM_CLASSES).astype(float)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_index_lands_in_exactly_one_client(scheme):
    # Prepare
    labels = _labels()
    # Execute
    parts = make_partition(labels, scheme, num_clients=12, seed=3, alpha=0.3, min_samples=5)
    # Assert
    assert len(parts) == 12
    _assert_exact_cover(parts, len(labels))


def test_iid_gives_near_equal_sizes_and_mixed_labels():
    labels = _labels(1003)
    parts = iid(labels, 10, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _mean_label_entropy(labels, parts) > 0.9 * np.log(NUM_CLASSES)


def test_dirichlet_small_alpha_is_more_label_skewed_than_large_alpha():
    labels = _labels(5000)
    skewed = dirichlet(labels, 20, alpha=0.1, min_samples=5, rng=np.random.default_rng(1))
    mixed = dirichlet(labels, 20, alpha=100.0, min_samples=5, rng=np.random.default_rng(1))
    assert _mean_label_entropy(labels, skewed) < 0.6 * _mean_label_entropy(labels, mixed)
    assert _mean_label_entropy(labels, mixed) > 0.95 * np.log(NUM_CLASSES)


def test_dirichlet_gives_every_client_at_least_min_samples():
    labels = _labels(2000)
    for seed in range(5):
        parts = make_partition(labels, "dirichlet", 20, seed, alpha=0.1, min_samples=30)
        assert min(len(p) for p in parts) >= 30
        _assert_exact_cover(parts, len(labels))


def test_dirichlet_with_impossible_min_samples_names_the_field():
    with pytest.raises(ValueError, match=r"data\.min_samples"):
        dirichlet(_labels(100), 10, alpha=0.5, min_samples=11, rng=np.random.default_rng(0))


def test_dirichlet_with_impossible_min_samples_suggests_the_largest_value_that_works():
    labels = _labels(100)
    best = largest_min_samples(labels, 10, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"exceeds the 100 samples") as info:
        dirichlet(labels, 10, alpha=0.5, min_samples=11, rng=np.random.default_rng(0))
    assert 1 <= best <= 10 and f"data.min_samples <= {best}" in str(info.value)


@pytest.mark.parametrize(("n", "clients", "alpha", "seed"), [(2000, 20, 0.1, 0), (2000, 50, 0.5, 3), (500, 10, 5.0, 1)])
def test_largest_min_samples_is_exactly_the_largest_value_dirichlet_accepts(n, clients, alpha, seed):
    labels = _labels(n)
    best = largest_min_samples(labels, clients, alpha, np.random.default_rng(seed), max_tries=30)

    parts = dirichlet(labels, clients, alpha, best, np.random.default_rng(seed), max_tries=30)
    with pytest.raises(ValueError) as info:
        dirichlet(labels, clients, alpha, best + 1, np.random.default_rng(seed), max_tries=30)

    assert best >= 1 and min(len(p) for p in parts) >= best
    works = "the largest data.min_samples that works for this data, federated.num_clients and federated.seed"
    assert f"{works} is {best}" in str(info.value)
    assert "\n" not in str(info.value)


def test_no_min_samples_works_when_every_draw_leaves_a_client_empty():
    # 60 clients sharing 100 samples with a very skewed Dirichlet: some client always gets nothing.
    labels = _labels(100)
    assert largest_min_samples(labels, 60, 0.1, np.random.default_rng(0), max_tries=50) == 0
    with pytest.raises(ValueError, match=r"no data\.min_samples works.*federated\.num_clients.*data\.partition: iid"):
        dirichlet(labels, 60, alpha=0.1, min_samples=1, rng=np.random.default_rng(0), max_tries=50)


def test_dirichlet_partitions_are_unchanged_by_the_size_only_draws():
    # Hashes of partitions made by the loop that cut every draw into per-client arrays (before 10,000-client
    # runs): the size-only draws must give the same partitions (same random stream, same cuts), or resuming
    # an older run's checkpoint would be refused as a different partition.
    labels = _labels(2000)
    expected = {0: "729f8090c64ce95ef9aeef0fe39583aabe7cf5ac60b6b280608014ed8b9eeef2",
                3: "9f01e2b96db9e2d20411b874b03893b7fa2ef411d9c11440c4e2659033bfa3ee"}
    for seed, digest in expected.items():
        assert partition_hash(make_partition(labels, "dirichlet", 20, seed, alpha=0.1, min_samples=30)) == digest
    many = make_partition(labels, "dirichlet", 200, 7, alpha=0.5, min_samples=3)
    assert partition_hash(many) == "fae908a516084fb46bf1042be61601ffd8c037abcd002ec13506fbbf85086287"


def test_dirichlet_that_never_reaches_min_samples_suggests_raising_alpha():
    # Every one of 10 clients needing exactly n/10 samples is (almost surely) never drawn.
    with pytest.raises(ValueError, match=r"raise data\.dirichlet_alpha"):
        dirichlet(_balanced_labels(), 10, alpha=0.05, min_samples=100, rng=np.random.default_rng(0), max_tries=3)


def test_same_seed_gives_same_partition_and_different_seed_a_different_one():
    labels = _labels()
    for scheme in ("iid", "dirichlet", "shards"):
        a = make_partition(labels, scheme, 8, seed=7)
        b = make_partition(labels, scheme, 8, seed=7)
        c = make_partition(labels, scheme, 8, seed=8)
        assert partition_hash(a) == partition_hash(b)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert partition_hash(a) != partition_hash(c)


def test_shards_give_most_clients_at_most_shards_per_client_classes():
    labels = np.random.default_rng(0).permutation(_balanced_labels(100))
    parts = shards(labels, 50, 2, np.random.default_rng(4))
    classes_per_client = (class_counts(labels, parts, NUM_CLASSES) > 0).sum(axis=1)
    _assert_exact_cover(parts, len(labels))
    assert np.mean(classes_per_client <= 2) >= 0.9
    assert {len(p) for p in parts} == {20}


def test_shards_on_unbalanced_labels_still_mostly_respect_shards_per_client():
    labels = _labels(3000)
    parts = make_partition(labels, "shards", 30, seed=1, shards_per_client=2)
    classes_per_client = (class_counts(labels, parts, NUM_CLASSES) > 0).sum(axis=1)
    assert np.mean(classes_per_client <= 2) >= 0.6
    assert classes_per_client.max() <= 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "diriclet"}, "data.partition"),
        ({"alpha": 0.0}, "data.dirichlet_alpha"),
        ({"alpha": -1.0}, "data.dirichlet_alpha"),
        ({"num_clients": 0}, "federated.num_clients"),
        ({"num_clients": 5000}, "federated.num_clients"),
        ({"scheme": "shards", "shards_per_client": 0}, "data.shards_per_client"),
        ({"scheme": "shards", "shards_per_client": 201}, "data.shards_per_client"),
    ],
)
def test_invalid_settings_raise_one_sentence_naming_the_config_field(kwargs, field):
    args = {"scheme": "dirichlet", "num_clients": 10, "alpha": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
        make_partition(_labels(), args.pop("scheme"), args.pop("num_clients"), 0, **args)
    assert "\n" not in str(info.value)


def test_split_local_is_disjoint_covering_and_keeps_a_train_sample():
    labels = _labels(500)
    parts = [*make_partition(labels, "dirichlet", 10, seed=0, alpha=0.5, min_samples=1), np.array([499])]
    splits = split_local(parts, 0.25, seed=5)
    for part, (train, test) in zip(parts, splits, strict=True):
        assert len(train) >= 1
        assert len(np.intersect1d(train, test)) == 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(part))
        assert abs(len(test) - 0.25 * len(part)) <= 1
    assert len(splits[-1][0]) == 1 and len(splits[-1][1]) == 0


def test_split_local_per_client_result_does_not_depend_on_other_clients():
    a = [np.arange(0, 40), np.arange(40, 100)]
    b = [np.arange(0, 40), np.arange(100, 140), np.arange(140, 150)]
    first_a, first_b = split_local(a, 0.3, seed=2)[0], split_local(b, 0.3, seed=2)[0]
    other_seed = split_local(a, 0.3, seed=3)[0]
    assert np.array_equal(first_a[1], first_b[1])
    assert not np.array_equal(first_a[1], other_seed[1])


def test_split_local_rejects_bad_fraction_and_empty_clients():
    with pytest.raises(ValueError, match=r"data\.local_test_fraction"):
        split_local([np.arange(5)], 1.0, seed=0)
    with pytest.raises(ValueError, match=r"client 1 has no samples"):
        split_local([np.arange(5), np.array([], dtype=np.int64)], 0.2, seed=0)


def test_class_counts_rows_sum_to_client_sizes():
    labels = _labels()
    parts = make_partition(labels, "iid", 7, seed=0)
    counts = class_counts(labels, parts, NUM_CLASSES)
    assert counts.shape == (7, NUM_CLASSES) and counts.dtype == np.int64
    assert np.array_equal(counts.sum(axis=1), [len(p) for p in parts])
    assert np.array_equal(counts.sum(axis=0), np.bincount(labels, minlength=NUM_CLASSES))


def test_partition_hash_detects_a_moved_index_and_ignores_integer_width():
    parts = [np.array([0, 1, 2], dtype=np.int64), np.array([3, 4], dtype=np.int64)]
    moved = [np.array([0, 1], dtype=np.int64), np.array([2, 3, 4], dtype=np.int64)]
    narrow = [p.astype(np.int32) for p in parts]
    assert partition_hash(parts) == partition_hash(narrow)
    assert partition_hash(parts) != partition_hash(moved)
    assert len(partition_hash(parts)) == 64

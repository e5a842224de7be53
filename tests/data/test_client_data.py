"""Per-client batch sampling: without replacement, reproducible, only from the given generator."""

import numpy as np
import pytest
import torch

from fedmetanas.data.client_data import ClientData, ClientIndex, build_clients, iterate_batches, sample_batch
from fedmetanas.data.datasets import TensorSplit


def _split(n: int = 50, channels: int = 3, size: int = 8) -> TensorSplit:
    """A split whose label is the row number, so a batch tells which rows it came from."""
    images = torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return TensorSplit(images, torch.arange(n), (0.5,) * channels, (0.25,) * channels, num_classes=n)


def test_build_clients_keeps_order_dtype_and_sizes():
    splits = [(np.array([3, 1]), np.array([2])), (np.array([0, 4, 5]), np.array([], dtype=np.int64))]
    clients = build_clients(splits)
    assert [c.client_id for c in clients] == [0, 1]
    assert [c.num_train for c in clients] == [2, 3]
    assert all(c.train_idx.dtype == torch.int64 and c.test_idx.dtype == torch.int64 for c in clients)
    assert isinstance(clients[0], ClientData) and clients[0].train_idx.tolist() == [3, 1]


def test_the_clients_rows_are_views_of_two_flat_tensors_whatever_their_number():
    # 10,000 clients are two tensors and offsets, not 20,000 tensors: a client is made when asked for.
    splits = [(np.arange(5 * i, 5 * i + 4), np.array([5 * i + 4])) for i in range(10_000)]

    clients = ClientIndex.from_splits(splits)

    assert len(clients) == 10_000
    assert clients.train_sizes.tolist() == [4] * 10_000 and clients.test_sizes.tolist() == [1] * 10_000
    assert clients[9_999].train_idx.tolist() == [49_995, 49_996, 49_997, 49_998]
    assert clients[9_999].test_idx.tolist() == [49_999] and clients[9_999].client_id == 9_999
    storage = clients.train.flat.untyped_storage().data_ptr()
    assert all(clients[i].train_idx.untyped_storage().data_ptr() == storage for i in (0, 1, 9_999))
    assert clients.train.to("cpu")[3].tolist() == clients[3].train_idx.tolist()


def test_a_client_index_reads_like_the_list_it_replaces():
    clients = build_clients([(np.array([7]), np.array([], dtype=np.int64)), (np.array([1, 2]), np.array([3]))])

    assert [(c.client_id, c.num_train, c.test_idx.numel()) for c in clients] == [(0, 1, 0), (1, 2, 1)]
    with pytest.raises(IndexError):
        clients[2]


def test_sample_batch_draws_distinct_rows_from_the_clients_indices():
    split, idx = _split(), torch.arange(10, 40)
    x, y = sample_batch(split, idx, 16, torch.Generator().manual_seed(1))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
    assert len(set(y.tolist())) == 16
    assert set(y.tolist()) <= set(idx.tolist())


def test_sample_batch_larger_than_the_index_set_uses_every_row_once():
    split, idx = _split(), torch.tensor([5, 7, 9])
    _, y = sample_batch(split, idx, 32, torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == [5, 7, 9]


def test_sample_batch_is_reproducible_and_leaves_global_rng_alone():
    split, idx = _split(), torch.arange(50)
    before = torch.get_rng_state()
    x1, y1 = sample_batch(split, idx, 8, torch.Generator().manual_seed(3), augment=True)
    x2, y2 = sample_batch(split, idx, 8, torch.Generator().manual_seed(3), augment=True)
    _, y3 = sample_batch(split, idx, 8, torch.Generator().manual_seed(4), augment=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_sample_batch_rejects_empty_index_sets():
    with pytest.raises(ValueError, match="non-empty"):
        sample_batch(_split(), torch.tensor([], dtype=torch.int64), 4, torch.Generator())


def test_iterate_batches_visits_indices_in_order_without_augmentation():
    split, idx = _split(), torch.tensor([9, 3, 4, 1, 0, 7, 8])
    batches = list(iterate_batches(split, idx, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.cat([y for _, y in batches]).tolist() == idx.tolist()
    assert torch.equal(torch.cat([x for x, _ in batches]), split.batch(idx)[0])


def test_a_split_moved_to_another_device_brings_its_normalisation_along():
    split = _split()
    moved = split.to("cpu")
    assert torch.equal(moved._mean, split._mean) and moved._mean.shape == (1, 3, 1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("augment", [False, True])
def test_a_batch_on_a_gpu_makes_no_host_sync_and_equals_the_cpu_batch(augment):
    from fedmetanas.runtime import count_syncs

    gpu = torch.device("cuda", torch.cuda.current_device())
    split, idx = _split(), torch.arange(5, 45)
    on_gpu, idx_gpu = split.to(gpu), idx.to(gpu)
    torch.cuda.synchronize()
    with count_syncs(gpu) as syncs:
        x, y = sample_batch(on_gpu, idx_gpu, 16, torch.Generator().manual_seed(3), augment)
    assert syncs.count == 0
    x_cpu, y_cpu = sample_batch(split, idx, 16, torch.Generator().manual_seed(3), augment)
    assert torch.equal(y.cpu(), y_cpu) and torch.allclose(x.cpu(), x_cpu, atol=1e-6, rtol=0)


# -- batch sizes against the clients' local splits (issue 10) ------------------------------------
def _batches(*overrides: str) -> list[tuple[str, int, int]]:
    """The batches the configured algorithm draws (its `batch_sizes()`)."""
    from fedmetanas.algorithms import get_algorithm
    from fedmetanas.configure import load_config

    cfg = load_config(None, list(overrides))
    return get_algorithm(cfg.algorithm.name)(cfg).batch_sizes()


def test_a_batch_larger_than_every_clients_split_is_refused_naming_the_field_and_the_size_that_works():
    from fedmetanas.config import ConfigError
    from fedmetanas.data.client_data import check_batch_sizes

    with pytest.raises(ConfigError, match=r"^algorithm\.batch_size \(100000\) .*9561\.\.13501 .*at most 9561"):
        check_batch_sizes(_batches("algorithm.batch_size=100000"), [12017, 12922, 13501, 9561])


def test_a_batch_larger_than_only_some_splits_warns_once_with_their_effective_size(caplog):
    from fedmetanas.data.client_data import check_batch_sizes

    warnings = check_batch_sizes(_batches("algorithm.batch_size=40", "algorithm.query_batch_size=16"),
                                 [100, 30, 35, 200])

    assert warnings == ["algorithm.batch_size (40) is larger than the local train split of 2 of 4 clients: "
                        "their batches are their whole split (30..35 samples)"]
    assert [r.getMessage() for r in caplog.records] == warnings


def test_batches_that_every_client_fills_pass_silently():
    from fedmetanas.data.client_data import check_batch_sizes

    assert check_batch_sizes(_batches(), [32, 33, 500]) == []


@pytest.mark.parametrize(("algorithm", "fields"), [
    ("fedmetanas", ["algorithm.batch_size", "algorithm.query_batch_size"]),
    ("fednas", ["fednas.batch_size", "fedavg.batch_size", "personalize.batch_size"]),
    ("fedavg", ["fedavg.batch_size", "personalize.batch_size"]),
    ("perfedavg", ["algorithm.batch_size", "algorithm.query_batch_size"]),
])
def test_only_the_batches_the_algorithm_draws_are_checked(algorithm, fields):
    assert [name for name, _, _ in _batches(f"algorithm.name={algorithm}")] == fields


def test_milenas_batches_are_checked_against_half_of_each_split():
    from fedmetanas.config import ConfigError
    from fedmetanas.data.client_data import check_batch_sizes

    batches = _batches("algorithm.name=fednas", "fednas.batch_size=60", "fedavg.batch_size=8",
                       "personalize.batch_size=8")
    with pytest.raises(ConfigError, match=r"fednas\.batch_size \(60\) is larger than every client's half"):
        check_batch_sizes(batches, [100, 110])

"""Shared fixtures: the real MNIST (from ../shared/data/mnist) unpacked once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real MNIST in torchvision's layout (skips where the copy is absent)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    from fedmetanas.data.fetch import fetch_mnist_from

    root = tmp_path_factory.mktemp("data")
    fetch_mnist_from(SHARED_MNIST, root)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test, as `make test` gets from OMP_NUM_THREADS=1: the models here are
    tiny, and with more threads than free cores thread hand-offs cost ~10x the compute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

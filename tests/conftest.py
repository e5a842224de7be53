"""Shared fixtures: the real Fashion-MNIST that the repository's own set-up provides (`make data`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / "data"  # `make data` (a dependency of `make test`) unpacks Fashion-MNIST here
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing(reason: str) -> None:
    """Skip a test whose data is absent, except under CI (CI=true), where a skipped test would hide that
    the set-up is broken: there it fails. Skips are for absent hardware or services, not data."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: data a test needs must be there)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """A data root holding the real Fashion-MNIST in torchvision's layout: the repository's data/."""
    raw = DATA_ROOT / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in IDX_FILES):
        missing(f"Fashion-MNIST not found under {raw}; run `make data`")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test, as `make test` gets from OMP_NUM_THREADS=1: the models here are
    tiny, and with more threads than free cores thread hand-offs cost ~10x the compute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

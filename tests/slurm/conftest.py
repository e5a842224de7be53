"""A real one-node Slurm cluster for the tests in this folder, started once and always shut down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import LocalSlurm, missing_binaries


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on a real local Slurm (skipped without slurm-wlm + munge)")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """munged + slurmctld + slurmd on loopback, with 2 stand-in GPUs; stopped by PID even when a test fails."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): "
                    "`make test-slurm` installs slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root; run as root (or `make test-slurm`)")
    cluster = LocalSlurm(gpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)

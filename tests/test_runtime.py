"""The device helpers: what `runtime.deterministic` switches, copies that never block the host, and the
memory and sync figures a round logs (plain answers on a CPU, real ones on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from fedmetanas.config import ConfigError
from fedmetanas.configure import load_config
from fedmetanas.runtime import (
    CUBLAS_DETERMINISTIC,
    configure_determinism,
    count_syncs,
    determinism_settings,
    peak_memory_mib,
    to_device,
)


@pytest.fixture
def restore_determinism(monkeypatch: pytest.MonkeyPatch):
    """Each test may flip the process-wide switches; PyTorch's defaults are put back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    configure_determinism(False)


def test_the_deterministic_switch_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_config(None, []).runtime.deterministic is True
    assert load_config(None, ["runtime.deterministic=false"]).runtime.deterministic is False


def test_deterministic_settings_pin_every_source_of_gpu_nondeterminism() -> None:
    on, off = determinism_settings(True), determinism_settings(False)
    assert on == {"cudnn.deterministic": True, "cudnn.benchmark": False, "use_deterministic_algorithms": True,
                  "matmul.allow_tf32": False, "cudnn.allow_tf32": False, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert off["use_deterministic_algorithms"] is False and off["cudnn.allow_tf32"] is True
    assert off["cudnn.benchmark"] is False  # autotuning is never on: it picks kernels by timing


def test_configure_determinism_sets_torch_and_the_cublas_workspace(restore_determinism) -> None:
    configure_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.allow_tf32


def test_a_users_own_deterministic_cublas_workspace_is_kept(restore_determinism,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_cpu_step_runs_under_the_deterministic_switch(restore_determinism) -> None:
    configure_determinism(True)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.MaxPool2d(2))
    net(torch.randn(2, 1, 6, 6)).mean((2, 3)).sum().backward()


def test_to_device_keeps_a_tensor_already_there() -> None:
    t = torch.arange(3)
    assert to_device(t, torch.device("cpu")) is t


def test_peak_memory_on_a_cpu_is_the_host_rss_and_no_gpu_memory() -> None:
    host, gpu = peak_memory_mib(torch.device("cpu"))
    assert host > 10 and gpu == 0.0


def test_no_syncs_are_counted_on_a_cpu() -> None:
    with count_syncs(torch.device("cpu")) as syncs:
        float(torch.ones(3).sum())
    assert syncs.count == 0


def test_master_addr_must_name_a_host() -> None:
    assert load_config(None, ["runtime.master_addr=node01"]).runtime.master_addr == "node01"
    for bad in ("runtime.master_addr=''", "runtime.master_addr='node 01'"):
        with pytest.raises(ConfigError, match=r"runtime\.master_addr"):
            load_config(None, [bad])


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_does_not_sync_and_copies_exactly() -> None:
    gpu = torch.device("cuda", torch.cuda.current_device())
    src = torch.randn(1000)
    with count_syncs(gpu) as syncs:
        out = to_device(src, gpu)
    assert syncs.count == 0 and torch.equal(out.cpu(), src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_count_syncs_sees_an_item_and_a_blocking_copy() -> None:
    gpu = torch.device("cuda", torch.cuda.current_device())
    t = torch.ones(3, device=gpu)
    with count_syncs(gpu) as syncs:
        float(t.sum())
        t.cpu()
    assert syncs.count == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_gpu_memory_counts_allocated_tensors() -> None:
    gpu = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats(gpu)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=gpu)
    assert peak_memory_mib(gpu)[1] >= 64
    del block

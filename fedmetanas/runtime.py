"""How a rank uses its device: determinism switches, host-to-device copies, memory and sync counts.

Everything here is a no-op or a plain answer on a CPU, so the CPU run and the GPU run share one code
path; the CUDA branches are covered by tests marked `gpu` and by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# cuBLAS needs a fixed workspace to give the same bits on every call (CUDA docs, "Results reproducibility").
CUBLAS_DETERMINISTIC = ":4096:8"
_CUBLAS_OK = (":4096:8", ":16:8")
# The text of the warning `torch.cuda.set_sync_debug_mode("warn")` gives at every host-device sync.
_SYNC_WARNING = "called a synchronizing CUDA operation"


def determinism_settings(deterministic: bool) -> dict[str, Any]:
    """The global switches `runtime.deterministic` stands for (pure: what `configure_determinism` sets).

    On: cuDNN picks deterministic kernels and never autotunes, every op with a nondeterministic CUDA
    kernel uses a deterministic one (or raises), TF32 is off for matmuls and convolutions, and cuBLAS gets
    a fixed workspace. Off: PyTorch's defaults (TF32 convolutions, atomics-based kernels).
    """
    return {
        "cudnn.deterministic": deterministic,
        "cudnn.benchmark": False,  # autotuning picks kernels by timing: never reproducible
        "use_deterministic_algorithms": deterministic,
        "matmul.allow_tf32": False,  # PyTorch's default too
        "cudnn.allow_tf32": not deterministic,
        "CUBLAS_WORKSPACE_CONFIG": CUBLAS_DETERMINISTIC if deterministic else None,
    }


def configure_determinism(deterministic: bool) -> dict[str, Any]:
    """Apply `determinism_settings(deterministic)` to this process; call before any CUDA work.

    CUBLAS_WORKSPACE_CONFIG is only set where the user has not set a deterministic value already; it must
    be in the environment before cuBLAS's first call, hence "before any CUDA work". Returns the settings.
    """
    settings = determinism_settings(deterministic)
    torch.backends.cudnn.deterministic = settings["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn.benchmark"]
    torch.use_deterministic_algorithms(settings["use_deterministic_algorithms"])
    # Filling every torch.empty with NaN is a debugging aid that costs a memset per allocation; no code
    # here reads memory it did not write.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn.allow_tf32"]
    if deterministic and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_OK:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    return settings


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host sync: a CPU tensor goes to a GPU through pinned memory, non-blocking.

    The copy is queued on the current stream; PyTorch's pinned-memory cache keeps the staging buffer until
    that copy has run, so `t` may be freed or changed at once. Other moves are plain `.to`.
    """
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> tuple[float, float]:
    """(peak resident host memory of this process, peak GPU memory allocated by tensors on `device`) in MiB.

    The GPU figure is `torch.cuda.max_memory_allocated` (0 on a CPU): tensors only, not the CUDA context
    or the caching allocator's reserve, so it is what the model and the lanes need.
    """
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return host, gpu


@dataclass
class SyncCount:
    """How many host-device synchronizations a block made (filled in when the block ends)."""

    count: int = 0


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[SyncCount]:
    """Count the host-device syncs of the enclosed block with CUDA's sync debug mode (0 on a CPU).

    Counts what PyTorch reports: `.item()`, `.cpu()`, blocking copies either way, `nonzero`, ... For
    measurements only (it turns warnings on for the whole process meanwhile).
    """
    found = SyncCount()
    if device.type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            found.count = sum(_SYNC_WARNING in str(w.message) for w in caught)

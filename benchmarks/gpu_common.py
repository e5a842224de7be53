"""What gpu_check's sections share: a deadline, results that survive a kill, bounded subprocesses.

No torch here: the orchestrator (benchmarks/gpu_check.py) imports this module and must stay free of CUDA,
since a CUDA context in the parent would hold GPU memory during every section's measurement.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "error", "timeout", "unavailable")  # a section's outcome; absent: not reached


class SectionTimeout(Exception):
    """A section's budget ran out; what it recorded so far is kept and its status is `timeout`."""


@dataclass(frozen=True)
class Deadline:
    """The wall-clock time (time.time()) by which a section must have written its result."""

    at: float

    def left(self) -> float:
        return max(self.at - time.time(), 0.0)

    def check(self, before: str) -> None:
        """Raise SectionTimeout when the budget is spent, naming what would have run next."""
        if time.time() >= self.at:
            raise SectionTimeout(f"budget spent before {before}")


def clean(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None: a NaN must never reach a table as a figure."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` (cleaned) atomically: a reader, or a kill mid-write, never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


class Record(dict):
    """A section's figures, written to its result file on every assignment, so that a section killed at
    its budget still leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        write_json(self.path, dict(self))

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(*args, **kwargs)
        write_json(self.path, dict(self))


@dataclass(frozen=True)
class SectionContext:
    """What a section function receives: the device asked for, sizes, where to write, and its deadline."""

    device: str  # "cuda" or "cpu"
    quick: bool  # tiny sizes: a dry run of the code paths, not figures
    out_dir: Path
    deadline: Deadline
    record: Record
    repeats: int


@dataclass(frozen=True)
class Bounded:
    """A finished (or killed) subprocess."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def default_threads() -> str:
    """OpenMP threads per process where the caller set none: 4 on a host of 8 cores or more (the GPU host
    has 16; the 2026-12-04 figures used 4), else 1, since on a 2-core machine more threads than free cores
    cost ~10x in hand-offs (tests/conftest.py)."""
    return "4" if (os.cpu_count() or 1) >= 8 else "1"


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout first on PYTHONPATH (an editable install elsewhere must
    not shadow it), OpenMP threads as the caller set them or `default_threads()`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", default_threads())
    return env


def kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process group of `proc` (mpirun forwards it to its ranks), SIGKILL it after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_bounded(cmd: list[str], deadline: Deadline, cwd: Path = REPO) -> Bounded:
    """Run `cmd` in its own process group until it ends or `deadline` passes (then the whole group is
    killed); output is captured either way, so a killed run still shows how far it got."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(deadline.left(), 0.1))
        return Bounded(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return Bounded(proc.returncode, out or "", err or "", True)

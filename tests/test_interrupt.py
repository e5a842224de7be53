"""Ctrl-C never hangs a job and never loses the log: the first one stops the run after its round (checkpoint,
exit 130), a second one at once; either way the HDF5 log opens with a plain `h5py.File(path, "r")` and
--resume continues the run."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import h5py
import pytest
import torch

from fedmetanas.checkpoint import list_checkpoints
from tests.helpers import launch, rank_pid, start, tiny_overrides, wait_for

ROUNDS = 5


def _args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(root, out, name) + [f"federated.rounds={ROUNDS}", "runtime.collective_timeout_s=60", *extra]


def _finish(proc, timeout: float = 120) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return err


def _stopped_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _plain_rounds(log: Path) -> list[int]:
    with h5py.File(log, "r") as f:  # not swmr=True: the file must have been closed properly
        assert "final" not in f
        return f["rounds/round"][()].tolist()


def _resume_completes(args: list[str], run_dir: Path) -> None:
    proc = launch(args + ["--resume"], np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == list(range(ROUNDS)) and "final" in f


@pytest.mark.mpi
def test_ctrl_c_to_rank_0_checkpoints_the_round_and_exits_130(data_root: Path, tmp_path: Path) -> None:
    """Issue 10: rank 0 died of KeyboardInterrupt and rank 1 waited collective_timeout_s in the barrier."""
    args = _args(data_root, tmp_path, "rank0")
    proc = start(args, np=2)
    wait_for(tmp_path / "rank0" / "checkpoints" / "round-000001.pt", proc)
    os.kill(rank_pid(f"output.dir={tmp_path}", 0), signal.SIGINT)
    t = time.time()
    err = _finish(proc)

    assert proc.returncode == 130, err[-3000:]
    assert time.time() - t < 60
    line = _stopped_line(err)
    assert "SIGINT" in line and "--resume" in line
    newest = torch.load(list_checkpoints(tmp_path / "rank0" / "checkpoints")[0], weights_only=False)
    assert len(_plain_rounds(tmp_path / "rank0" / "trajectory.h5")) == newest["next_round"] < ROUNDS
    _resume_completes(args, tmp_path / "rank0")


@pytest.mark.mpi
def test_ctrl_c_to_the_whole_job_exits_130_with_a_readable_log(data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the launcher's process group; it passes SIGINT on to every rank."""
    args = _args(data_root, tmp_path, "job")
    proc = start(args, np=2)
    wait_for(tmp_path / "job" / "checkpoints" / "round-000001.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    err = _finish(proc)

    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in _stopped_line(err)
    assert len(_plain_rounds(tmp_path / "job" / "trajectory.h5")) < ROUNDS
    _resume_completes(args, tmp_path / "job")


@pytest.mark.mpi
def test_a_second_ctrl_c_ends_the_run_at_once(data_root: Path, tmp_path: Path) -> None:
    args = _args(data_root, tmp_path, "twice", "algorithm.local_steps=30")  # rounds of seconds: both land in one
    proc = start(args, np=2)
    wait_for(tmp_path / "twice" / "checkpoints" / "round-000001.pt", proc)
    rank0 = rank_pid(f"output.dir={tmp_path}", 0)
    os.kill(rank0, signal.SIGINT)
    time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):  # today the first one already ends it
        os.kill(rank0, signal.SIGINT)
    t = time.time()
    err = _finish(proc)

    assert proc.returncode == 130, err[-3000:]
    assert time.time() - t < 30
    assert "--resume" in _stopped_line(err)
    _plain_rounds(tmp_path / "twice" / "trajectory.h5")


def test_ctrl_c_while_the_program_loads_is_one_line_and_exit_130(data_root: Path, tmp_path: Path) -> None:
    """Issue 21 (extra input): Ctrl-C in the first second (torch importing) printed a KeyboardInterrupt traceback."""
    proc = start(tiny_overrides(data_root, tmp_path))
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    err = _finish(proc)

    assert proc.returncode == 130, err[-3000:]
    assert "before the first round" in _stopped_line(err) or "--resume" in _stopped_line(err)

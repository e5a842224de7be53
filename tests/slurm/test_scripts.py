"""The batch scripts without Slurm: each asks for preemption handling, and `slurm/launch.sh` forwards the
signal, requeues on exit 75 and passes other exit codes through (with stand-in `srun`/`scontrol`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

SLURM = REPO / "slurm"
SCRIPTS = sorted(p.name for p in SLURM.glob("*.sbatch"))
GPU_SCRIPTS = ("single_node.sbatch", "multi_node.sbatch", "sweep_array.sbatch")


def _directives(script: str) -> dict[str, str]:
    """`#SBATCH --key=value` lines as a mapping (flags without a value map to '')."""
    found = re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", (SLURM / script).read_text(), flags=re.MULTILINE)
    return dict(found)


def test_the_four_scripts_exist() -> None:
    assert set(SCRIPTS) == {"cpu_test.sbatch", "single_node.sbatch", "multi_node.sbatch", "sweep_array.sbatch"}


@pytest.mark.parametrize("script", [*SCRIPTS, "launch.sh"])
def test_every_script_is_valid_bash(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_is_preemptible_and_resumes(script: str) -> None:
    options = _directives(script)
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])  # to the batch shell, which forwards it
    assert "requeue" in options and options["open-mode"] == "append"
    last = (SLURM / script).read_text().strip().splitlines()[-1]
    assert last == 'exec "${REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"'
    assert "--resume" in (SLURM / "launch.sh").read_text()


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_give_each_rank_its_own_gpu(script: str) -> None:
    assert _directives(script)["gpus-per-task"] == "1"


def test_the_multi_node_script_asks_for_several_nodes() -> None:
    assert int(_directives("multi_node.sbatch")["nodes"]) > 1


# --- launch.sh's preemption flow with stand-ins for srun and scontrol -----------------------------

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$CALLS"
[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"
trap 'echo usr1 >> "$CALLS"; exit 75' USR1
echo ready >> "$CALLS"
while :; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$CALLS"
exit "${FAKE_SCONTROL_EXIT:-0}"
"""


def _start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), REPO=str(REPO), SLURM_JOB_ID="42",
                SLURM_NTASKS="2", RUN_NAME="r", OMP_NUM_THREADS="1")
    full.update(env)
    proc = subprocess.Popen([str(SLURM / "launch.sh")], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, calls


def _lines(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def _wait_for(calls: Path, line: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(x.startswith(line) for x in _lines(calls)):
        assert time.monotonic() < deadline, f"no {line!r} in {_lines(calls)}; {proc.poll()}"
        time.sleep(0.02)


def test_usr1_to_the_batch_shell_reaches_the_run_and_exit_75_requeues_the_job(tmp_path: Path) -> None:
    proc, calls = _start(tmp_path)
    try:
        _wait_for(calls, "ready", proc)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
        _wait_for(calls, "scontrol", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Slurm ends the shell as part of the requeue
        proc.wait()
    lines = _lines(calls)
    assert lines[0].startswith("srun --mpi=none --ntasks=2 --kill-on-bad-exit=1 ")
    assert lines[0].endswith("launch/main.py --config configs/default.yaml --name r --resume "
                             "runtime.threads_per_rank=1")
    assert lines[1:] == ["ready", "usr1", "scontrol requeue 42"]


@pytest.mark.parametrize("code", [0, 1, 3, 4])
def test_other_exit_codes_pass_through_without_a_requeue(tmp_path: Path, code: int) -> None:
    proc, calls = _start(tmp_path, FAKE_EXIT=str(code), OVERRIDES="federated.rounds=3 data.name=mnist")
    proc.communicate(timeout=30)
    assert proc.returncode == code
    assert len(_lines(calls)) == 1 and _lines(calls)[0].endswith("federated.rounds=3 data.name=mnist")


def test_when_the_requeue_fails_the_job_ends_75_saying_how_to_continue(tmp_path: Path) -> None:
    proc, calls = _start(tmp_path, FAKE_SCONTROL_EXIT="1")
    _wait_for(calls, "ready", proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "scontrol requeue 42" in _lines(calls)
    assert "could not requeue; resubmit with RUN_NAME=r" in err


def test_a_run_stopped_without_usr1_is_not_requeued(tmp_path: Path) -> None:
    # SIGTERM from `scancel` also makes the run checkpoint and exit 75: a cancelled job must stay cancelled.
    proc, calls = _start(tmp_path, FAKE_EXIT="75")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and not any(line.startswith("scontrol") for line in _lines(calls))
    assert "not requeued; resubmit with RUN_NAME=r" in err


def test_an_unknown_launcher_is_one_line_naming_launcher(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, LAUNCHER="torchrun")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.strip() == "error: LAUNCHER=torchrun is not supported; use srun or mpirun"


def test_a_submit_directory_that_is_not_the_repository_is_one_line_naming_repo(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, REPO=str(tmp_path))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.strip().endswith("submit from the repository root or set REPO")

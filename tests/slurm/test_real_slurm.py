"""The project's own batch scripts on a real (one-node) Slurm: a 2-rank search runs to its end under
mpirun and under srun, a preempted job checkpoints, requeues itself and ends bit-identical to an
uninterrupted one, and the GPU and array scripts run with one (stand-in) GPU per task."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from tests.helpers import REPO, tiny_overrides
from tests.slurm.cluster import LocalSlurm

pytestmark = pytest.mark.slurm

ROUNDS = 8  # enough rounds after the first checkpoint for a preemption signal to land mid-run
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
# The stand-in node has 2 CPUs and 2 GPUs: shrink the GPU scripts' requests to fit it.
FIT_NODE = ("--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:30:00")


def _overrides(data_root: Path, out_dir: Path) -> str:
    return " ".join([o for o in tiny_overrides(data_root, out_dir) if not o.startswith("output.name=")]
                    + [f"federated.rounds={ROUNDS}"])


def _submit(cluster: LocalSlurm, script: str, log: Path, *sbatch_args: str, **env: str) -> str:
    """sbatch a script of slurm/ with settings in the environment, as a user would; returns the job id."""
    cluster.env.update(REPO=str(REPO), **env)
    try:
        out = cluster.run("sbatch", "--parsable", f"--output={log}", *sbatch_args, str(REPO / "slurm" / script))
    finally:
        for key in ("REPO", *env):
            cluster.env.pop(key, None)
    return out.stdout.strip().split(";")[0]


def _wait_until_done(cluster: LocalSlurm, job_id: str, log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (state := cluster.job_field(job_id, "JobState")) not in DONE:
        assert time.monotonic() < deadline, f"job {job_id} still {state}\n{_tail(log)}\n{cluster.logs()}"
        time.sleep(0.3)
    return state


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else f"(no {log})"


def _final(run_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    saved = torch.load(run_dir / "supernet.pt", weights_only=False)
    return {k: v.numpy() for k, v in saved["state_dict"].items()}, (run_dir / "genotype.txt").read_text()


def _assert_complete_log(run_dir: Path, world_size: int = 2) -> None:
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == list(range(ROUNDS))
        assert "final" in f
        assert int(f.attrs["world_size"]) == world_size


def _assert_identical(run_dir: Path, reference: tuple[dict[str, np.ndarray], str]) -> None:
    state, genotype = _final(run_dir)
    assert genotype == reference[1]
    assert state.keys() == reference[0].keys()
    for name in state:
        assert np.array_equal(state[name], reference[0][name]), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm-runs")


@pytest.fixture(scope="module")
def reference(slurm_cluster: LocalSlurm, data_root: Path, runs: Path) -> tuple[dict[str, np.ndarray], str]:
    """The CPU batch script (2 ranks, mpirun) run to its end, uninterrupted."""
    log = runs / "reference.out"
    job = _submit(slurm_cluster, "cpu_test.sbatch", log, RUN_NAME="reference",
                  OVERRIDES=_overrides(data_root, runs), LAUNCHER="mpirun")
    assert _wait_until_done(slurm_cluster, job, log) == "COMPLETED", _tail(log)
    assert slurm_cluster.job_field(job, "ExitCode") == "0:0", _tail(log)
    return _final(runs / "reference")


def test_the_cpu_batch_script_runs_a_two_rank_search_to_its_end(reference, runs: Path) -> None:
    _assert_complete_log(runs / "reference")
    log = (runs / "reference.out").read_text()
    assert "--resume" in log and "no checkpoint" in log  # every start resumes; the first one starts afresh
    assert "on 2 rank(s)" in log


def test_srun_without_mpi_runs_the_same_search(slurm_cluster: LocalSlurm, data_root: Path, runs: Path,
                                               reference) -> None:
    log = runs / "srun.out"
    job = _submit(slurm_cluster, "cpu_test.sbatch", log, RUN_NAME="srun", OVERRIDES=_overrides(data_root, runs),
                  LAUNCHER="srun", SRUN_MPI="none")
    assert _wait_until_done(slurm_cluster, job, log) == "COMPLETED", _tail(log)
    assert "srun --mpi=none" in log.read_text()
    _assert_complete_log(runs / "srun")
    _assert_identical(runs / "srun", reference)


def test_a_preempted_job_checkpoints_requeues_itself_and_ends_identical(slurm_cluster: LocalSlurm, data_root: Path,
                                                                       runs: Path, reference) -> None:
    log = runs / "preempted.out"
    job = _submit(slurm_cluster, "cpu_test.sbatch", log, RUN_NAME="preempted",
                  OVERRIDES=_overrides(data_root, runs), LAUNCHER="mpirun")
    first = runs / "preempted" / "checkpoints" / "round-000001.pt"
    deadline = time.monotonic() + 180
    while not first.exists():
        assert slurm_cluster.job_field(job, "JobState") not in DONE, _tail(log)
        assert time.monotonic() < deadline, f"no checkpoint\n{_tail(log)}"
        time.sleep(0.05)
    # What `--signal=B:USR1@120` does before the time limit: USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)

    # The job goes back to the queue, Slurm starts it again after its hold (cred_expire + 1 s) and it resumes.
    assert _wait_until_done(slurm_cluster, job, log) == "COMPLETED", _tail(log)
    assert slurm_cluster.job_field(job, "Restarts") == "1"

    text = log.read_text()
    assert "USR1: asking the run to checkpoint and stop" in text
    assert "stopped by SIGUSR1 after round" in text  # in the middle of the run, not at its end
    assert "continue with --resume" in text and "launcher exited with 75" in text
    assert f"requeued job {job}" in text and "resumed from" in text
    _assert_complete_log(runs / "preempted")  # every round logged exactly once
    _assert_identical(runs / "preempted", reference)


def test_the_single_node_gpu_script_runs_one_rank_per_gpu(slurm_cluster: LocalSlurm, data_root: Path, runs: Path,
                                                          reference) -> None:
    log, seen = runs / "gpu.out", runs / "gpu-seen.txt"
    python = runs / "python-recording-its-gpu"  # PYTHON is a setting of the scripts: wrap the venv's
    python.write_text(f'#!/bin/bash\necho "$SLURM_PROCID $CUDA_VISIBLE_DEVICES" >> {seen}\n'
                      f'exec {REPO / ".venv" / "bin" / "python"} "$@"\n')
    python.chmod(0o755)
    job = _submit(slurm_cluster, "single_node.sbatch", log, *FIT_NODE, RUN_NAME="gpu", PYTHON=str(python),
                  OVERRIDES=_overrides(data_root, runs))
    assert _wait_until_done(slurm_cluster, job, log) == "COMPLETED", _tail(log)
    assert "srun --mpi=none" in log.read_text()
    assert sorted(seen.read_text().splitlines()) == ["0 0", "1 1"]  # rank r alone sees GPU r
    _assert_complete_log(runs / "gpu")
    _assert_identical(runs / "gpu", reference)  # the stand-in GPUs are not CUDA devices: ranks use the CPU


def test_the_sweep_array_runs_one_search_per_alpha(slurm_cluster: LocalSlurm, data_root: Path, runs: Path) -> None:
    log = runs / "sweep-%a.out"
    array = _submit(slurm_cluster, "sweep_array.sbatch", log, *FIT_NODE, "--array=0-1", ALPHAS="0.1 1.0",
                    RUN_PREFIX="sweep", OVERRIDES=_overrides(data_root, runs) + " federated.rounds=2")
    for task, alpha in enumerate((0.1, 1.0)):
        task_log = runs / f"sweep-{task}.out"
        assert _wait_until_done(slurm_cluster, f"{array}_{task}", task_log) == "COMPLETED", _tail(task_log)
        run_dir = runs / f"sweep-alpha{alpha}"
        with h5py.File(run_dir / "trajectory.h5", "r") as f:
            assert "final" in f
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dirichlet_alpha"] == alpha


@pytest.mark.parametrize(("script", "fit"), [
    ("cpu_test.sbatch", ()),
    ("single_node.sbatch", FIT_NODE),
    ("sweep_array.sbatch", FIT_NODE),
    ("multi_node.sbatch", ("--nodes=1", *FIT_NODE)),  # one node here: the rest of its request is checked
])
def test_sbatch_accepts_every_script_s_request(slurm_cluster: LocalSlurm, script: str, fit: tuple[str, ...]) -> None:
    proc = slurm_cluster.run("sbatch", "--test-only", *fit, str(REPO / "slurm" / script), check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


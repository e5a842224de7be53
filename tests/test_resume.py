"""A run that dies loses nothing: resumed from its checkpoint it ends bit-identical to an uninterrupted
run, and its HDF5 log holds every round exactly once. The same holds for the server optimizer's state
and for a run its time budget ended (resumed with a larger budget, it continues as if never stopped)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from fedmetanas import cli
from fedmetanas.algorithms import ALGORITHMS, declared_sections
from fedmetanas.algorithms.fedavg import FedAvg, FedAvgConfig
from fedmetanas.config import all_sections, to_dict
from fedmetanas.configure import load_config, section_classes
from tests.helpers import launch, tiny_overrides
from tests.helpers import rank_pid as _rank_pid
from tests.helpers import start as _start
from tests.helpers import wait_for as _wait_for

ROUNDS = 4


def _overrides(root: Path, out: Path, name: str) -> list[str]:
    return tiny_overrides(root, out, name) + [f"federated.rounds={ROUNDS}"]


def _final(run_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    saved = torch.load(run_dir / "supernet.pt", weights_only=False)
    return ({k: v.numpy() for k, v in saved["state_dict"].items()}, (run_dir / "genotype.txt").read_text())


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], str]:
    out = tmp_path_factory.mktemp("ref")
    proc = launch(_overrides(data_root, out, "ref"), np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final(out / "ref")


def _assert_identical(run_dir: Path, reference: tuple[dict[str, np.ndarray], str]) -> None:
    state, genotype = _final(run_dir)
    ref_state, ref_genotype = reference
    assert genotype == ref_genotype
    assert state.keys() == ref_state.keys()
    for name in state:
        assert np.array_equal(state[name], ref_state[name]), name
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == list(range(ROUNDS))
        assert "final" in f


@pytest.mark.mpi
def test_a_run_killed_inside_a_round_resumes_bit_identical(data_root: Path, tmp_path: Path, reference) -> None:
    args = _overrides(data_root, tmp_path, "killed")
    proc = _start(args, 2)
    # Kill every rank (SIGKILL: no handler runs) as soon as round 2's checkpoint lands, i.e. in round 3.
    _wait_for(tmp_path / "killed" / "checkpoints" / "round-000002.pt", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "genotype.txt").exists()

    resumed = launch(args + ["--resume"], np=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_identical(tmp_path / "killed", reference)


@pytest.mark.mpi
def test_a_preemption_signal_checkpoints_exits_75_and_resumes_bit_identical(data_root: Path, tmp_path: Path,
                                                                           reference) -> None:
    args = _overrides(data_root, tmp_path, "preempted")
    proc = _start(args, 2)
    _wait_for(tmp_path / "preempted" / "checkpoints" / "round-000001.pt", proc)
    os.killpg(proc.pid, signal.SIGUSR1)  # as SLURM's --signal delivers it to every task
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert "continue with --resume" in stderr
    with h5py.File(tmp_path / "preempted" / "trajectory.h5", "r") as f:
        assert "final" not in f and f["rounds/round"].shape[0] < ROUNDS

    resumed = launch(args + ["--resume"], np=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(tmp_path / "preempted", reference)


def test_a_checkpoint_from_a_different_search_is_refused_naming_the_field(data_root: Path, tmp_path: Path) -> None:
    first = launch(_overrides(data_root, tmp_path, "run") + ["federated.rounds=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    proc = launch(_overrides(data_root, tmp_path, "run") + ["--resume", "algorithm.inner_steps=2"])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "algorithm.inner_steps" in errors[0]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(data_root: Path, tmp_path: Path) -> None:
    args = _overrides(data_root, tmp_path, "run") + ["federated.rounds=2"]
    assert launch(args).returncode == 0
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "round-000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn, as a disk-full or a bad copy would leave it
    proc = launch(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unreadable" in proc.stderr and "round-000001.pt" in proc.stderr


@pytest.mark.mpi
def test_a_hung_rank_is_named_by_the_survivor_within_the_timeout(data_root: Path, tmp_path: Path) -> None:
    args = _overrides(data_root, tmp_path, "hung") + ["runtime.collective_timeout_s=8"]
    proc = _start(args, 2)
    _wait_for(tmp_path / "hung" / "checkpoints" / "round-000001.pt", proc)
    hung = _rank_pid(f"output.dir={tmp_path}", 1)
    os.kill(hung, signal.SIGSTOP)
    t = time.time()
    try:
        _, stderr = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher normally ends the stopped rank itself
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - t < 60
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert errors and "rank 1 did not reach" in errors[0] and "--resume" in errors[0], stderr[-2000:]
    state = torch.load(tmp_path / "hung" / "checkpoints" / "round-000001.pt", weights_only=False)
    assert state["next_round"] >= 1


def test_resume_finds_the_same_data_by_another_path(data_root: Path, tmp_path: Path) -> None:
    """Issue 10: --resume with data.root naming the same data by another path was "a different search";
    the data's identity is the partition's hash, not where the files lie."""
    first = launch(_overrides(data_root, tmp_path, "run") + ["federated.rounds=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    elsewhere = tmp_path / "same-data"
    elsewhere.symlink_to(data_root.resolve(), target_is_directory=True)

    proc = launch(_overrides(elsewhere, tmp_path, "run") + ["federated.rounds=2", "--resume"])

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    with h5py.File(tmp_path / "run" / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0, 1]


# -- the server optimizer's state ------------------------------------------------------------------------------
@pytest.mark.mpi
def test_fedadam_s_moments_are_checkpointed_and_a_resume_is_bit_identical(data_root: Path, tmp_path: Path,
                                                                          reference) -> None:
    args = _overrides(data_root, tmp_path, "adam") + ["federated.server_optimizer=adam", "federated.server_lr=0.03",
                                                      "checkpoint.keep=10", "personalize.steps=0"]
    whole = launch(args, np=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir, cut = tmp_path / "adam", tmp_path / "cut"
    ckpt = torch.load(run_dir / "checkpoints" / "round-000002.pt", weights_only=False)
    saved = ckpt["server_optimizer"]
    # One float64 value per parameter (weights and alphas) in m and in v; BN statistics are only averaged.
    params = sum(v.numel() for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked")))
    assert set(saved) == {"m", "v"} and saved["m"].dtype == torch.float64
    assert saved["m"].shape == saved["v"].shape == (params,) and (saved["v"] > 0).any()

    # Prepare: the run as a kill after round 2's checkpoint leaves it.
    shutil.copytree(run_dir, cut)
    for path in (cut / "checkpoints").glob("round-*.pt"):
        if int(path.stem.split("-")[1]) > 2:
            path.unlink()
    for name in ("genotype.txt", "discrete_model.pt", "supernet.pt"):
        (cut / name).unlink()
    resumed = launch([a.replace("output.name=adam", "output.name=cut") for a in args] + ["--resume"], np=2)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(cut, _final(run_dir))
    adam_state, _ = _final(run_dir)
    assert any(not np.array_equal(adam_state[k], reference[0][k]) for k in adam_state)  # the optimizer acted


# -- the time budget -----------------------------------------------------------------------------------------
BUDGET = ["federated.time_budget_s=0.001"]  # spent by any round: the run ends after its first


@pytest.fixture(scope="module")
def budget_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """A 4-round run under mpirun -np 2 whose time budget ends it after round 1 (run dir, args, stderr)."""
    out = tmp_path_factory.mktemp("budget")
    args = _overrides(data_root, out, "budget") + BUDGET
    proc = launch(args, np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "budget", args, proc.stderr


@pytest.mark.mpi
def test_a_spent_time_budget_ends_the_run_at_the_round_boundary_and_finalizes_it(budget_run) -> None:
    run_dir, _, stderr = budget_run
    assert "stopped_by=time_budget after round 1 of 4" in stderr
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0]
        assert f["final"].attrs["stopped_by"] == "time_budget"
        assert json.loads(f.attrs["stages"]) == [{"kind": "search", "group": "rounds", "first": 0, "rounds": 1}]
        assert "personalization" in f  # finalized normally: final evaluation, personalization
    for name in ("genotype.txt", "discrete_model.pt", "supernet.pt", "checkpoints/round-000001.pt"):
        assert (run_dir / name).is_file(), name


def test_a_run_whose_budget_is_spent_resumes_to_no_further_round(budget_run, tmp_path: Path) -> None:
    """The training time counts on from the checkpoint's wall time: the budget is still spent."""
    run_dir, args, _ = budget_run
    again = tmp_path / "budget"
    shutil.copytree(run_dir, again)
    (again / "genotype.txt").unlink()
    proc = launch([a.replace(f"output.dir={run_dir.parent}", f"output.dir={tmp_path}") for a in args] + ["--resume"])

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped_by=time_budget after round 1" in proc.stderr
    assert (again / "genotype.txt").read_text() == (run_dir / "genotype.txt").read_text()
    with h5py.File(again / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0] and f["final"].attrs["stopped_by"] == "time_budget"


@pytest.mark.mpi
def test_a_run_stopped_by_its_budget_continues_bit_identical_with_a_larger_one(budget_run, tmp_path: Path,
                                                                               reference) -> None:
    run_dir, args, _ = budget_run
    shutil.copytree(run_dir, tmp_path / "budget")
    args = [a.replace(f"output.dir={run_dir.parent}", f"output.dir={tmp_path}") for a in args if a not in BUDGET]

    proc = launch(args + ["federated.time_budget_s=0", "--resume"], np=2)

    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_identical(tmp_path / "budget", reference)
    with h5py.File(tmp_path / "budget" / "trajectory.h5", "r") as f:
        assert f["final"].attrs["stopped_by"] == "rounds"


def test_a_run_killed_in_round_1_is_started_afresh_by_resume(data_root: Path, tmp_path: Path) -> None:
    """Issue 21: SIGKILL before the first checkpoint left a log still flagged as being written; --resume
    refused it ("holds no readable checkpoint") and the report called it "unreadable HDF5 file"."""
    args = tiny_overrides(data_root, tmp_path)
    run_dir = tmp_path / "tiny"
    proc = _start(args)
    _wait_for(run_dir / "trajectory.h5", proc)  # the log exists from the start; round 1 has not ended
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not list((run_dir / "checkpoints").glob("*.pt"))

    from fedmetanas.reporting import report  # noqa: PLC0415

    with pytest.raises(report.ReportError, match="killed before it logged a round.*--resume"):
        report.load_run(run_dir / "trajectory.h5")

    resumed = launch(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0, 1]


@pytest.mark.parametrize(("limit_kb", "file"), [(100, "round-000001.pt"), (60, "trajectory.h5")])
def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_resumable(data_root: Path, tmp_path: Path,
                                                                        limit_kb: int, file: str) -> None:
    """Issue 21: `ulimit -f` below a checkpoint's size gave a traceback (`OSError: [Errno 27] File too large`),
    left `round-000001.pt.tmp`, and --resume was refused afterwards. Below the log's size after round 1 (its
    creation is ~10 KB, round 1 makes it ~75 KB): h5py's own "Exception ignored" messages, and a crash at exit."""
    import resource  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from fedmetanas.launcher import command  # noqa: PLC0415

    args = tiny_overrides(data_root, tmp_path)
    limit = limit_kb * 1024  # 100: above the config and the log of round 1, below a checkpoint (~160 KB)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    full = subprocess.run(command(args), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, preexec_fn=small_files)
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1, full.stderr[-2000:]
    assert f"{file}" in errors[0] and "failed (File too large" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    assert not list((tmp_path / "tiny").glob("checkpoints/*"))  # no .pt.tmp left behind

    resumed = launch(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with h5py.File(tmp_path / "tiny" / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0, 1]


# -- a checkpoint outlives additions to the registry ----------------------------------------------------------
FEDAVG = ["algorithm.name=fedavg", "fedavg.architecture=cnn", "fedavg.local_steps=2", "fedavg.batch_size=16",
          "fedavg.lr=0.07", "federated.rounds=3", "checkpoint.keep=10", "personalize.steps=2", "personalize.lr=0.05"]
_CLOCKS = ("time_", "wall_time", "memory_")  # measured, not computed: they differ between any two runs


@dataclasses.dataclass(frozen=True)
class _ProxConfig:
    mu: float = 0.01


class _FedProx(FedAvg):
    """A throwaway algorithm with a section of its own, as someone might add after a run started."""

    name = "fedprox"
    sections = {"fedavg": FedAvgConfig, "fedprox": _ProxConfig}


def _fedavg_args(root: Path, out: Path, name: str) -> list[str]:
    return tiny_overrides(root, out, name) + FEDAVG


@pytest.fixture(scope="module")
def fedavg_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-round FedAvg run (one process, in this one), every checkpoint kept."""
    out = tmp_path_factory.mktemp("fedavg")
    assert cli.main(_fedavg_args(data_root, out, "whole")) == 0
    return out / "whole"


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every computed dataset of an HDF5 log, by name."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                     and not name.split("/")[-1].startswith(_CLOCKS) else None)
    return found


def test_a_runs_config_yaml_and_checkpoint_hold_only_its_algorithms_sections(fedavg_run: Path, data_root: Path) -> None:
    # Prepare: the config the run was started with
    cfg = load_config(None, _fedavg_args(data_root, fedavg_run.parent, "whole"))
    core = list(all_sections({}))
    expected = core[:core.index("algorithm") + 1] + ["fedavg"] + core[core.index("algorithm") + 1:]

    # Execute: what the run saved
    saved = yaml.safe_load((fedavg_run / "config.yaml").read_text())
    state = torch.load(fedavg_run / "checkpoints" / "round-000001.pt", weights_only=False)

    # Assert: no other algorithm's section, and the file loads back to the very config
    assert list(saved) == list(state["config"]) == expected
    assert load_config(fedavg_run / "config.yaml") == cfg


def test_a_checkpoint_from_before_an_algorithm_was_added_resumes_bit_identical(
        fedavg_run: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the run as a kill after round 1's checkpoint leaves it, that checkpoint written as before this
    # rule (its config holds every registered algorithm's section, not only the active one's) ...
    cut = tmp_path / "cut"
    shutil.copytree(fedavg_run, cut)
    for path in (cut / "checkpoints").glob("round-*.pt"):
        if int(path.stem.split("-")[1]) > 1:
            path.unlink()
    (cut / "model.pt").unlink()
    ckpt = cut / "checkpoints" / "round-000001.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"] = {**state["config"], **{k: to_dict(cls()) for k, cls in declared_sections().items()
                                             if k not in state["config"]}}
    assert {"fednas", "perfedavg"} <= set(state["config"])
    torch.save(state, ckpt)
    # ... and an algorithm with a section of its own registered since.
    monkeypatch.setitem(ALGORITHMS, "fedprox", _FedProx)
    assert "fedprox" in section_classes()

    # Execute
    assert cli.main(_fedavg_args(data_root, tmp_path, "cut") + ["--resume"]) == 0, capsys.readouterr().err[-2000:]

    # Assert: the same bits as the run never stopped: final model, every computed dataset of the log
    want = torch.load(fedavg_run / "model.pt", weights_only=False)["state_dict"]
    got = torch.load(cut / "model.pt", weights_only=False)["state_dict"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ref, log = _datasets(fedavg_run / "trajectory.h5"), _datasets(cut / "trajectory.h5")
    assert log.keys() == ref.keys() and "rounds/discrete_acc" in ref and "personalization/acc_after" in ref
    for name in ref:
        assert np.array_equal(log[name], ref[name]), name  # numbers and text (/rounds/capture) alike
    with h5py.File(cut / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0, 1, 2]

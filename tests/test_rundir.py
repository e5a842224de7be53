"""Run directories are safe: marked when a run creates them, locked while it lives, and --overwrite clears
only a marked one after taking its lock; a second start of the same name fails naming the running one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmetanas import rundir
from fedmetanas.config import OutputConfig
from fedmetanas.rundir import LOCK, MARKER, RunDirError, acquire_run_dir, check_run_dir
from tests.helpers import start, tiny_overrides, wait_for


@pytest.fixture(autouse=True)
def _short_lock_wait(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 0.2)


def _out(tmp_path: Path, name: str = "run", **kw: bool) -> OutputConfig:
    return OutputConfig(dir=str(tmp_path / "runs"), name=name, **kw)


def test_a_new_run_directory_is_marked_and_locked_before_anything_else_is_written(tmp_path: Path) -> None:
    with acquire_run_dir(_out(tmp_path)) as lock:
        path = tmp_path / "runs" / "run"
        assert lock.path == path and lock.held
        assert sorted(p.name for p in path.iterdir()) == sorted([LOCK, MARKER])
        assert rundir.running_holder(path) is not None
    assert rundir.running_holder(path) is None  # released


def test_a_second_start_while_the_first_holds_the_directory_fails_naming_it(tmp_path: Path) -> None:
    with acquire_run_dir(_out(tmp_path)):
        for cfg in (_out(tmp_path), _out(tmp_path, overwrite=True), _out(tmp_path, resume=True)):
            with pytest.raises(RunDirError, match=r"in use by a running run \(pid \d+ on .*\); wait for it"):
                acquire_run_dir(cfg)
            with pytest.raises(RunDirError, match="in use by a running run"):
                check_run_dir(cfg)


def test_overwrite_replaces_a_marked_run_only_after_taking_its_lock(tmp_path: Path) -> None:
    with acquire_run_dir(_out(tmp_path)) as lock:
        (lock.path / "trajectory.h5").write_bytes(b"old run")
        (lock.path / "checkpoints").mkdir()
        (lock.path / "checkpoints" / "round-000001.pt").write_bytes(b"old")
        with pytest.raises(RunDirError):
            acquire_run_dir(_out(tmp_path, overwrite=True))
        assert (lock.path / "trajectory.h5").read_bytes() == b"old run"  # untouched while the old run holds it

    with acquire_run_dir(_out(tmp_path, overwrite=True)) as again:
        assert sorted(p.name for p in again.path.iterdir()) == sorted([LOCK, MARKER])


@pytest.mark.parametrize("content", ["a user's folder", "a run made before runs were marked"])
def test_overwrite_never_deletes_a_directory_that_is_not_a_marked_run(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    keep = folder / ("trajectory.h5" if "run" in content else "thesis.tex")
    keep.write_text(content)

    with pytest.raises(RunDirError, match=r"output\.overwrite: .* not a fedmetanas run directory"):
        acquire_run_dir(_out(tmp_path, overwrite=True))

    assert keep.read_text() == content and not (folder / MARKER).exists()


@pytest.mark.parametrize("flags", [{}, {"resume": True}])
def test_a_users_folder_that_is_not_a_run_is_never_written_into(tmp_path: Path, flags: dict[str, bool]) -> None:
    """Issue 21: a start without --overwrite used to replace the folder's config.yaml and genotype.txt and
    mark it, after which --overwrite deleted the rest."""
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    files = {"config.yaml": "mine", "genotype.txt": "mine too", "other.txt": "notes"}
    for name, text in files.items():
        (folder / name).write_text(text)

    with pytest.raises(RunDirError, match=r"output\.name: .* not a fedmetanas run directory"):
        acquire_run_dir(_out(tmp_path, **flags))

    assert {p.name: p.read_text() for p in folder.iterdir()} == files  # no marker, no lock file, nothing changed


def test_an_empty_folder_made_for_the_run_is_used(tmp_path: Path) -> None:
    (tmp_path / "runs" / "run").mkdir(parents=True)
    with acquire_run_dir(_out(tmp_path)) as lock:
        assert (lock.path / MARKER).is_file()


def test_a_file_where_the_run_directory_would_be_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run").write_text("a file")

    with pytest.raises(RunDirError, match="is a file"):
        acquire_run_dir(_out(tmp_path, overwrite=True))
    assert (tmp_path / "runs" / "run").read_text() == "a file"


def test_a_path_longer_than_the_file_system_allows_is_a_run_dir_error(tmp_path: Path) -> None:
    name = "/".join(["d" * 200] * 25)

    with pytest.raises(RunDirError, match=r"^output\.name: .* longer than the file system allows"):
        check_run_dir(_out(tmp_path, name))
    with pytest.raises(RunDirError, match="longer than the file system allows"):
        acquire_run_dir(_out(tmp_path, name))


def test_the_same_name_started_twice_runs_once(data_root: Path, tmp_path: Path) -> None:
    """Issue 10: two starts of one name both passed the "already holds a run" check and shared files."""
    args = tiny_overrides(data_root, tmp_path, "twice") + ["federated.rounds=4"]
    first = start(args)
    wait_for(tmp_path / "twice" / "trajectory.h5", first)
    second = start(args + ["--overwrite"])  # even asked to overwrite, it must not touch the running run
    _, err = second.communicate(timeout=120)
    out, first_err = first.communicate(timeout=300)

    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "in use by a running run (pid" in errors[0] and "Traceback" not in err
    assert f"pid {first.pid} " in errors[0]
    assert "final genotype" in out and (tmp_path / "twice" / "genotype.txt").is_file()


def test_the_same_name_started_twice_at_once_runs_once(data_root: Path, tmp_path: Path) -> None:
    """Both starts pass the "already holds a run" check together; the lock lets only one of them write."""
    args = tiny_overrides(data_root, tmp_path, "race") + ["federated.rounds=3"]
    procs = [start(args), start(args)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]

    assert sorted(code for code, _ in results) == [0, 2], [err[-1500:] for _, err in results]
    err = next(err for code, err in results if code == 2)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "in use by a running run" in errors[0] or "already holds a run" in errors[0]
    assert not list((tmp_path / "race").glob("*.tmp")) and (tmp_path / "race" / "genotype.txt").is_file()

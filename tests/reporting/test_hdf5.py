"""The trajectory log: static facts at creation, one row per round, readable while it is written."""

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fedmetanas.reporting.hdf5 import (FORMAT_VERSION, NullLog, TornLogError, TrajectoryLog, close_open_logs,
                                       logged_rounds, read_log, read_rounds)

ATTRS = {"config": {"federated": {"rounds": 3}, "model": {"primitives": ["conv_3x3"]}}, "name": "unit", "seed": 7}
STATIC = {"partition/class_counts": np.arange(12).reshape(3, 4), "partition/names": "dirichlet"}


def _record(r: int) -> dict:
    return {
        "loss": 1.0 / (r + 1),
        "round": r,
        "alpha_normal": np.full((2, 3), r, dtype=np.float32),
        "genotype": f"genotype-{r}",
        "mask": np.array([True, r % 2 == 0, False]),
    }


def _reader_rounds(path) -> int:
    """Open the file from a separate process, in SWMR mode, and count the rows under /rounds."""
    code = ("import h5py, sys\n"
            "with h5py.File(sys.argv[1], 'r', swmr=True) as f:\n"
            "    print(f['rounds/loss'].shape[0] if 'rounds' in f else 0)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_creation_writes_attributes_and_static_datasets(tmp_path):
    path = tmp_path / "run.h5"

    log = TrajectoryLog(path, ATTRS, STATIC)
    log.close()

    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(f.attrs["config"]) == ATTRS["config"]  # dicts are stored as JSON text
        assert f.attrs["name"] == "unit" and f.attrs["seed"] == 7
        assert np.array_equal(f["partition/class_counts"][()], np.arange(12).reshape(3, 4))
        assert f["partition/names"][()].decode() == "dirichlet"
        assert "rounds" not in f


def test_per_client_arrays_written_once_are_stored_compressed_and_read_back_exactly(tmp_path):
    # What a 10,000-client run writes once: class counts per client, and personalization of 100 of them.
    rng = np.random.default_rng(0)
    counts = rng.multinomial(6, [0.1] * 10, size=10_000)
    personal = np.full(10_000, np.nan)
    personal[rng.choice(10_000, 100, replace=False)] = rng.random(100)
    path = tmp_path / "run.h5"

    log = TrajectoryLog(path, {}, {"partition/class_counts": counts, "partition/names": "iid"})
    log.close(datasets={"personalization/acc_after": personal})

    with h5py.File(path, "r") as f:
        assert np.array_equal(f["partition/class_counts"][()], counts)
        assert np.array_equal(f["personalization/acc_after"][()], personal, equal_nan=True)
    assert path.stat().st_size < (counts.nbytes + personal.nbytes) / 5


def test_creation_refuses_to_overwrite_an_existing_file(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"already here")

    with pytest.raises(OSError):
        TrajectoryLog(path, {}, {})

    assert path.read_bytes() == b"already here"


def test_three_appended_rounds_give_datasets_with_three_rows(tmp_path):
    path = tmp_path / "run.h5"
    log = TrajectoryLog(path, ATTRS, STATIC)

    for r in range(3):
        log.append(_record(r))
    assert log.rounds_written == 3
    log.close()

    with h5py.File(path, "r") as f:
        rounds = f["rounds"]
        assert set(rounds) == set(_record(0))
        assert rounds["loss"].shape == (3,) and rounds["round"].shape == (3,)
        assert rounds["alpha_normal"].shape == (3, 2, 3)
        assert rounds["genotype"].shape == (3,) and rounds["mask"].shape == (3, 3)
        assert np.allclose(rounds["loss"][()], [1.0, 0.5, 1 / 3])
        assert rounds["round"][()].tolist() == [0, 1, 2]
        assert rounds["alpha_normal"].dtype == np.float32
        assert np.array_equal(rounds["alpha_normal"][()], np.stack([np.full((2, 3), r) for r in range(3)]))
        assert [s.decode() for s in rounds["genotype"][()]] == ["genotype-0", "genotype-1", "genotype-2"]
        assert rounds["mask"][()].astype(bool).tolist() == [[True, True, False], [True, False, False],
                                                           [True, True, False]]


def test_a_record_with_changed_keys_is_rejected(tmp_path):
    log = TrajectoryLog(tmp_path / "run.h5", {}, {})
    log.append(_record(0))
    extra = dict(_record(1), new_metric=1.0)
    missing = {k: v for k, v in _record(1).items() if k != "loss"}

    with pytest.raises(KeyError, match="new_metric"):
        log.append(extra)
    with pytest.raises(KeyError, match="loss"):
        log.append(missing)

    log.append(_record(1))  # the log is still usable
    assert log.rounds_written == 2
    log.close()
    assert read_rounds(tmp_path / "run.h5")["round"].tolist() == [0, 1]


def test_another_process_reads_the_rounds_while_the_writer_is_open(tmp_path):
    path = tmp_path / "run.h5"
    log = TrajectoryLog(path, ATTRS, STATIC)

    try:
        log.append(_record(0))
        seen_after_one = _reader_rounds(path)
        log.append(_record(1))
        seen_after_two = _reader_rounds(path)
    finally:
        log.close()

    assert (seen_after_one, seen_after_two) == (1, 2)


def test_close_with_final_stores_a_summary_group(tmp_path):
    path = tmp_path / "run.h5"
    log = TrajectoryLog(path, {}, {})
    log.append(_record(0))

    log.close(final={"test_accuracy": 0.875, "genotype": "g-final", "rounds": 1})
    log.close()  # closing twice is harmless

    with h5py.File(path, "r") as f:
        final = f["final"].attrs
        assert final["test_accuracy"] == 0.875
        assert final["genotype"] == "g-final"
        assert final["rounds"] == 1
        assert f["rounds/loss"].shape == (1,)


def test_close_without_final_adds_no_summary(tmp_path):
    path = tmp_path / "run.h5"
    log = TrajectoryLog(path, {}, {})

    log.close()

    with h5py.File(path, "r") as f:
        assert "final" not in f


def test_read_rounds_returns_arrays(tmp_path):
    path = tmp_path / "run.h5"
    log = TrajectoryLog(path, {}, {})
    for r in range(3):
        log.append(_record(r))

    during = read_rounds(path)
    log.close()
    after = read_rounds(path)

    for rounds in (during, after):
        assert set(rounds) == set(_record(0))
        assert all(isinstance(v, np.ndarray) for v in rounds.values())
        assert rounds["alpha_normal"].shape == (3, 2, 3)
        assert rounds["round"].tolist() == [0, 1, 2]


def test_read_rounds_of_a_log_without_rounds_is_empty(tmp_path):
    path = tmp_path / "run.h5"
    TrajectoryLog(path, {}, {}).close()

    assert read_rounds(path) == {}


def test_null_log_accepts_everything_and_writes_nothing(tmp_path):
    log = NullLog()

    for r in range(3):
        log.append(_record(r))
    log.append({"anything": 1})
    log.close(final={"x": 1})

    assert log.rounds_written == 0
    assert list(tmp_path.iterdir()) == []


def test_a_second_table_can_be_started_after_the_first_rows_and_both_stay_readable(tmp_path):
    """FedNAS's retraining rows go to /retrain, created after /rounds already switched the file to SWMR."""
    path = tmp_path / "two.h5"
    log = TrajectoryLog(path, ATTRS, STATIC)
    log.append(_record(0))
    log.append(_record(1))
    log.append({"round": 2, "acc": 0.5}, "retrain")
    log.append({"round": 3, "acc": 0.6}, "retrain")
    assert _reader_rounds(path) == 2  # a reader sees the file while it is still open
    log.close(final={"acc": 0.6}, datasets={"personalization/acc_after": np.array([0.1, 0.2])})
    assert read_rounds(path)["round"].tolist() == [0, 1]
    assert read_rounds(path, "retrain")["acc"].tolist() == [0.5, 0.6]
    with h5py.File(path, "r") as f:
        assert f["personalization/acc_after"][()].tolist() == [0.1, 0.2]
        assert f["final"].attrs["acc"] == 0.6
    with pytest.raises(KeyError):
        other = TrajectoryLog(tmp_path / "three.h5", ATTRS, STATIC)
        other.append({"round": 0, "acc": 0.5}, "retrain")
        other.append({"round": 1}, "retrain")


# -- never left open, never a hang (issue 10) -----------------------------------------------------
_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from fedmetanas.reporting.hdf5 import TrajectoryLog
log = TrajectoryLog(sys.argv[1], {"name": "killed"}, {"partition/class_counts": np.ones((3, 4))})
for r in range(int(sys.argv[2])):
    log.append({"round": r, "loss": 1.0 / (r + 1), "alpha_normal": np.full((5, 7), r, dtype=np.float32),
                "genotype": "g" * 40})
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no clean-up: the file keeps its SWMR-write flag
raise KeyboardInterrupt  # Ctrl-C escaping the program: the log is closed at exit
"""


def write_log_and_die(path, rounds: int = 30, how: str = "kill") -> None:
    """A log whose writer died after `rounds` rounds: by SIGKILL, or by an uncaught KeyboardInterrupt."""
    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), str(rounds), how], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and path.is_file(), proc.stderr


def test_close_open_logs_leaves_a_file_a_plain_reader_opens(tmp_path):
    log = TrajectoryLog(tmp_path / "run.h5", ATTRS, STATIC)
    log.append(_record(0))  # now in SWMR-write mode

    close_open_logs()

    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == [0]
    log.close()  # a second close is harmless


def test_a_log_whose_program_died_of_ctrl_c_is_closed_at_exit(tmp_path):
    write_log_and_die(tmp_path / "run.h5", 3, "interrupt")

    with h5py.File(tmp_path / "run.h5", "r") as f:  # plain, not swmr=True
        assert f["rounds/round"][()].tolist() == [0, 1, 2]


def test_a_killed_writers_log_is_still_read_but_a_truncated_copy_is_torn_at_once(tmp_path):
    path = tmp_path / "killed.h5"
    write_log_and_die(path)
    assert read_rounds(path)["round"].tolist() == list(range(30))

    torn = tmp_path / "torn.h5"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TornLogError, match="truncated"):
        read_log(torn, lambda f: f["rounds/loss"][()])
    assert logged_rounds(torn) is None


def test_an_swmr_read_that_does_not_finish_is_given_up_after_the_timeout(tmp_path):
    path = tmp_path / "killed.h5"
    write_log_and_die(path, 2)

    with pytest.raises(TornLogError, match="not readable within 0.3 s"):
        read_log(path, lambda f: time.sleep(3), timeout_s=0.3)  # as HDF5 retrying a torn chunk forever

"""The report: every figure from the log of a tiny real run, overlays of several runs, logs of killed and
still-running runs, one-line errors for bad files, and a page whose images all load in a browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from fedmetanas.reporting.hdf5 import TrajectoryLog
from fedmetanas.reporting.page import main as report_main
from tests.helpers import REPO, launch, tiny_overrides

FIGURES = ["ops_normal.png", "ops_reduce.png", "pairs.png", "entropy.png", "genotype.png", "accuracy.png",
           "partition.png", "time.png", "client_loss.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_logs(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("runs")
    logs = []
    for name, alpha in (("alpha05", "0.5"), ("alpha01", "0.1")):
        proc = launch(tiny_overrides(mnist_root, out, name) + [f"data.dirichlet_alpha={alpha}", "federated.rounds=3"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(out / name / "trajectory.h5")
    return logs


def _valid_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1024


def test_the_report_of_one_run_has_every_figure_and_a_page(tiny_logs: list[Path], tmp_path: Path) -> None:
    assert report_main([str(tiny_logs[0]), "--out", str(tmp_path)]) == 0
    for name in FIGURES:
        assert _valid_png(tmp_path / name), name
    page = (tmp_path / "index.html").read_text()
    assert all(f"src='{name}'" in page for name in FIGURES)
    assert "finished" in page and "alpha05" in page


def test_several_runs_are_overlaid_and_each_gets_its_figures(tiny_logs: list[Path], tmp_path: Path) -> None:
    assert report_main([*map(str, tiny_logs), "--out", str(tmp_path)]) == 0
    assert _valid_png(tmp_path / "overlay_accuracy.png")
    for i in range(2):
        assert all(_valid_png(tmp_path / f"run{i}_{name}") for name in FIGURES)
    assert "alpha01" in (tmp_path / "index.html").read_text()


def test_a_killed_runs_log_without_final_results_still_reports(tiny_logs: list[Path], tmp_path: Path) -> None:
    killed = tmp_path / "killed" / "trajectory.h5"
    killed.parent.mkdir()
    shutil.copy(tiny_logs[0], killed)
    with h5py.File(killed, "a") as f:
        del f["final"]
    assert report_main([str(killed), "--out", str(tmp_path / "out")]) == 0
    assert "unfinished (3 rounds so far)" in (tmp_path / "out" / "index.html").read_text()
    assert _valid_png(tmp_path / "out" / "genotype.png")


def test_a_log_still_being_written_is_reported_from_another_process(tiny_logs: list[Path], tmp_path: Path) -> None:
    with h5py.File(tiny_logs[0], "r") as f:
        attrs = dict(f.attrs)
        static = {f"partition/{k}": v[()] for k, v in f["partition"].items()}
        rows = [{k: ds[i] for k, ds in f["rounds"].items()} for i in range(f["rounds/round"].shape[0])]
    (tmp_path / "live").mkdir()
    live = TrajectoryLog(tmp_path / "live" / "trajectory.h5", attrs, static)
    for row in rows[:2]:
        live.append(row)
    cmd = [sys.executable, "-m", "fedmetanas.report", str(live.path), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    live.append(rows[2])
    live.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unfinished (2 rounds so far)" in (tmp_path / "out" / "index.html").read_text()


@pytest.mark.parametrize("content", [None, b"not an hdf5 file"])
def test_a_missing_or_foreign_file_is_one_error_line(content: bytes | None, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.h5"
    if content is not None:
        path.write_bytes(content)
    assert report_main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(path) in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_every_image_of_the_page_loads_in_headless_chromium(tiny_logs: list[Path], tmp_path: Path) -> None:
    report_main([*map(str, tiny_logs), "--out", str(tmp_path)])
    proc = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", (tmp_path / "index.html").as_uri()], capture_output=True, text=True, timeout=120)
    ok = re.search(r'data-images-ok="(\d+)"', proc.stdout)
    total = re.search(r'data-images-total="(\d+)"', proc.stdout)
    assert ok and total, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert int(total.group(1)) == 1 + 2 * len(FIGURES)
    assert int(ok.group(1)) == int(total.group(1))

"""The report: from the HDF5 log of a tiny real run it draws every figure and a page whose images all load in a
browser; it overlays several runs, reads the logs of killed and still-running runs, skips what a log lacks
(saying so), and turns a bad file into one error line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmetanas.reporting import plots
from fedmetanas.reporting.hdf5 import TrajectoryLog
from fedmetanas.reporting.report import (
    PER_RUN,
    SHARED,
    annealed_probabilities,
    load_run,
    main,
    personalization_table,
    write_report,
)
from tests.helpers import REPO, launch, tiny_overrides

ROUNDS = 3
ALWAYS_SHARED = list(SHARED)  # every run personalizes by default (personalize.steps > 0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Graphviz renderings of the genotype come in addition where `dot` is installed.
GRAPHVIZ = ["genotype_normal_graphviz.png", "genotype_reduce_graphviz.png"] if shutil.which("dot") else []


def _is_png(path: Path) -> bool:
    data = path.read_bytes() if path.is_file() else b""
    return data.startswith(PNG_SIGNATURE) and len(data) > 1024


def _images(page: Path) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page.read_text())


@pytest.fixture(scope="module")
def tiny_logs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The logs of two tiny real searches (Dirichlet 0.5 and 0.1), run side by side."""
    out = tmp_path_factory.mktemp("runs")
    jobs = [("alpha05", "0.5"), ("alpha01", "0.1")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        procs = list(pool.map(lambda job: launch(tiny_overrides(data_root, out, job[0]) + [
            f"data.dirichlet_alpha={job[1]}", f"federated.rounds={ROUNDS}"]), jobs))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return [out / name / "trajectory.h5" for name, _ in jobs]


@pytest.fixture(scope="module")
def overlay_report(tiny_logs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of both tiny runs together."""
    out = tmp_path_factory.mktemp("overlay")
    assert main([*map(str, tiny_logs), "--out", str(out)]) == 0
    return out / "index.html"


def test_the_report_of_a_run_draws_every_figure_and_links_it_from_the_page(tiny_logs: list[Path],
                                                                             tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")  # a file of the user's in --out
    assert main([str(tiny_logs[0]), "--out", str(tmp_path)]) == 0

    expected = ALWAYS_SHARED + list(PER_RUN) + GRAPHVIZ
    for name in expected:
        assert _is_png(tmp_path / name), name
    assert sorted(_images(tmp_path / "index.html")) == sorted(expected)
    page = (tmp_path / "index.html").read_text()
    assert "alpha05" in page and "finished" in page and f"<td>{ROUNDS}</td>" in page
    with h5py.File(tiny_logs[0], "r") as f:
        final_acc, genotype = f["final"].attrs["discrete_acc"], f["final"].attrs["genotype"]
    assert f"{final_acc:.4f}" in page
    ops = {op for cell in ("normal", "reduce") for node in eval(genotype)[cell] for op, _ in node}
    dot = (tmp_path / "genotype_normal.dot").read_text() + (tmp_path / "genotype_reduce.dot").read_text()
    assert dot.startswith("digraph") and all(op in dot for op in ops)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_probabilities_follow_the_logged_logits_masks_and_temperature(tiny_logs: list[Path]) -> None:
    run = load_run(tiny_logs[0])
    r = run.rounds
    for kind in ("alpha", "beta"):
        for cell in ("normal", "reduce"):
            logits, mask = r[f"{kind}_{cell}"], r[f"mask_{kind}_{cell}"]
            probs = annealed_probabilities(logits, mask, r["tau"])
            assert np.allclose(probs.sum(axis=-1), 1.0) and np.all(probs[mask == 0] == 0)
            # The same entropy the writer logged: the report reads the distribution the search used.
            h = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
            assert np.allclose(h, r[f"entropy_{kind}_{cell}"], atol=1e-4)


def test_pair_slots_are_in_the_order_of_the_supernets_beta_columns() -> None:
    from fedmetanas.search.supernet import input_pairs

    assert all(plots.pair_slots(j) == input_pairs(j + 2) for j in range(5))


def test_several_runs_are_overlaid_on_shared_figures_and_each_keeps_its_own(overlay_report: Path) -> None:
    out = overlay_report.parent
    for name in ALWAYS_SHARED:
        assert _is_png(out / name), name
    for i in (1, 2):
        assert all(_is_png(out / f"run{i}_{name}") for name in PER_RUN)
    page = overlay_report.read_text()
    assert "alpha05" in page and "alpha01" in page and "All runs overlaid" in page


def test_the_accuracy_figure_draws_both_nets_of_every_run_in_one_colour_per_run(tiny_logs: list[Path]) -> None:
    runs = {run.label: run.series() for run in map(load_run, tiny_logs)}
    fig = plots.accuracy_and_loss(runs)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 * len(runs)  # discrete + supernet, per run
    assert len({tuple(np.round(line.get_color(), 3)) for line in lines}) == len(runs)
    assert {line.get_linestyle() for line in lines} == {"-", "--"}


def test_a_killed_runs_log_is_reported_up_to_its_last_complete_round(tiny_logs: list[Path], tmp_path: Path) -> None:
    killed = tmp_path / "killed" / "trajectory.h5"
    killed.parent.mkdir()
    shutil.copy(tiny_logs[0], killed)
    with h5py.File(killed, "a") as f:
        del f["final"]
        f["rounds/discrete_acc"].resize(ROUNDS - 1, axis=0)  # a round torn halfway through its row
    assert main([str(killed), "--out", str(tmp_path / "out")]) == 0

    run = load_run(killed)
    assert run.num_rounds == ROUNDS - 1 and {len(v) for v in run.rounds.values()} == {ROUNDS - 1}
    page = (tmp_path / "out" / "index.html").read_text()
    assert "unfinished" in page and f"genotype after round {ROUNDS - 1}" in page
    assert all(_is_png(tmp_path / "out" / name) for name in PER_RUN)


def test_a_log_still_being_written_is_reported_by_another_process(tiny_logs: list[Path], tmp_path: Path) -> None:
    with h5py.File(tiny_logs[0], "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "format_version"}
        static = {f"partition/{k}": v[()] for k, v in f["partition"].items()}
        rows = [{k: ds.asstr()[i] if ds.dtype.kind == "O" else ds[i] for k, ds in f["rounds"].items()}
                for i in range(f["rounds/round"].shape[0])]
    (tmp_path / "live").mkdir()
    live = TrajectoryLog(tmp_path / "live" / "trajectory.h5", attrs, static)
    try:
        for row in rows[:2]:
            live.append(row)
        cmd = [sys.executable, "-m", "fedmetanas.report", str(live.path), "--out", str(tmp_path / "out")]
        proc = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
        live.append(rows[2])  # the writer goes on undisturbed
    finally:
        live.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"report: {(tmp_path / 'out' / 'index.html').resolve()}"
    page = (tmp_path / "out" / "index.html").read_text()
    assert "unfinished" in page and "2 round(s) logged" in page
    assert all(_is_png(tmp_path / "out" / name) for name in PER_RUN)
    assert load_run(live.path).num_rounds == 3


@pytest.fixture(scope="module")
def roundless_log(tiny_logs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log as a run leaves it when killed during its first round: attributes and partition, no rounds."""
    with h5py.File(tiny_logs[0], "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "format_version"}
        static = {f"partition/{k}": v[()] for k, v in f["partition"].items()}
    path = tmp_path_factory.mktemp("roundless") / "trajectory.h5"
    TrajectoryLog(path, attrs, static).close()
    return path


def test_a_log_without_rounds_yet_shows_the_partition_and_says_why(roundless_log: Path, tmp_path: Path) -> None:
    assert main([str(roundless_log), "--out", str(tmp_path)]) == 0
    assert _images(tmp_path / "index.html") == ["partition.png"]
    assert "No round logged yet" in (tmp_path / "index.html").read_text()


def test_figures_whose_data_is_absent_are_skipped_and_the_page_says_so(tiny_logs: list[Path], tmp_path: Path) -> None:
    log = tmp_path / "pairless" / "trajectory.h5"
    log.parent.mkdir()
    shutil.copy(tiny_logs[0], log)
    with h5py.File(log, "a") as f:  # as with search.input_mode: all, and an older writer
        for name in ("beta_normal", "beta_reduce", "mask_beta_normal", "mask_beta_reduce", "entropy_beta_normal",
                     "entropy_beta_reduce", "client_loss", "time_eval"):
            del f[f"rounds/{name}"]
        del f["personalization"]
    assert main([str(log), "--out", str(tmp_path / "out")]) == 0
    shown = set(_images(tmp_path / "out" / "index.html"))
    assert not shown & {"pairs_normal.png", "pairs_reduce.png", "client_loss.png", "time.png", "personalized.png"}
    assert {"ops_normal.png", "genotype.png", "accuracy.png"} <= shown
    page = (tmp_path / "out" / "index.html").read_text()
    assert "search.input_mode: all" in page and "lacks time_eval" in page and "Personalized accuracy: not in" in page


def test_personalized_accuracy_is_drawn_when_a_log_carries_it(tiny_logs: list[Path], tmp_path: Path) -> None:
    log = tmp_path / "personal" / "trajectory.h5"
    log.parent.mkdir()
    shutil.copy(tiny_logs[0], log)
    with h5py.File(log, "a") as f:
        k = f["partition/class_counts"].shape[0]
        del f["personalization"]  # another layout of the same facts
        f["personalization/accuracy"] = np.linspace(0.5, 0.9, k)
    assert write_report([log], tmp_path / "out").name == "index.html"
    assert "personalized.png" in _images(tmp_path / "out" / "index.html")
    assert _is_png(tmp_path / "out" / "personalized.png")


def test_the_personalization_table_lists_each_client_before_and_after_and_names_the_worst() -> None:
    # Prepare: client 1 lost 21 points, client 2 was not measured, client 3 holds one class
    before = np.array([0.50, 0.987, np.nan, 0.155])
    after = np.array([0.90, 0.775, np.nan, 0.128])
    counts = np.array([[5, 5, 0], [0, 9, 1], [3, 3, 3], [0, 0, 10]])
    # Execute
    rows, worst = personalization_table(before, after, counts)
    # Assert
    assert [r["client"] for r in rows] == ["0", "1", "3"]
    assert rows[1] == {"client": "1", "classes held (train)": "1:90% 2:10%", "before %": "98.70",
                       "after %": "77.50", "change (points)": "-21.20"}
    assert rows[2]["classes held (train)"] == "2:100%"
    assert worst.startswith("Worst client: 3 (12.80% after personalization, 15.50% before)")
    assert "largest drop: client 1, 21.20 points" in worst
    _, fine = personalization_table(np.array([0.5, 0.6]), np.array([0.7, 0.6]))
    assert fine.endswith("no client lost accuracy.")


def test_the_page_shows_the_per_client_personalization_table(tiny_logs: list[Path], tmp_path: Path) -> None:
    assert main([str(tiny_logs[1]), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "index.html").read_text()
    with h5py.File(tiny_logs[1], "r") as f:
        before, after = f["personalization/acc_before"][()], f["personalization/acc_after"][()]
    assert "Personalization per client" in page and "Worst client: " in page
    for k in np.flatnonzero(np.isfinite(before)):
        assert f"<td>{100 * before[k]:.2f}</td><td>{100 * after[k]:.2f}</td>" in page


def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)


@pytest.mark.parametrize("make, says", [
    (None, "no such file"),
    (lambda p: p.write_bytes(b"not an hdf5 file"), "not an HDF5 file"),
    (_foreign_hdf5, "not a fedmetanas trajectory log"),
    (lambda p: p.mkdir(), "is a directory"),
], ids=["missing", "text", "foreign-hdf5", "directory"])
def test_a_bad_file_is_one_error_line_naming_it(make, says: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.h5"
    if make is not None:
        make(path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(path) in err and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_log_opened_by_a_writer_before_its_first_round_is_an_error_not_a_crash(tmp_path: Path) -> None:
    log = TrajectoryLog(tmp_path / "trajectory.h5", {"primitives": ["a"], "nodes": 1}, {})
    try:
        cmd = [sys.executable, "-m", "fedmetanas.report", str(log.path), "--out", str(tmp_path / "out")]
        proc = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    finally:
        log.close()
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not readable yet" in proc.stderr


def test_labels_name_the_runs_on_the_page_one_per_log(roundless_log: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert load_run(roundless_log, "FedMetaNAS, Dir(0.5)").label == "FedMetaNAS, Dir(0.5)"
    assert main([str(roundless_log), "--out", str(tmp_path / "a"), "--label", "x", "--label", "y"]) == 2
    assert capsys.readouterr().err.startswith("error: --label: 2 label(s) for 1 log(s)")
    assert main([str(roundless_log), "--out", str(tmp_path / "b"), "--label", "Dir<0.5>"]) == 0
    assert "Dir&lt;0.5&gt;" in (tmp_path / "b" / "index.html").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_every_image_of_the_page_loads_in_headless_chromium(overlay_report: Path, tmp_path: Path) -> None:
    cmd = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", overlay_report.as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    ok = re.search(r'data-images-ok="(\d+)"', proc.stdout)
    total = re.search(r'data-images-total="(\d+)"', proc.stdout)
    assert ok and total, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert int(total.group(1)) == len(_images(overlay_report)) == len(ALWAYS_SHARED) + 2 * (len(PER_RUN) + len(GRAPHVIZ))
    assert int(ok.group(1)) == int(total.group(1))


@pytest.mark.parametrize("writer", ["finished", "killed"])
def test_a_truncated_log_is_one_error_line_never_a_hang(tiny_logs: list[Path], tmp_path: Path, writer: str) -> None:
    """Issue 10: a log cut to half kept the report in an SWMR read forever. A finished log is closed (HDF5
    checks its length); a killed writer's is still flagged as being written (SWMR read, bounded)."""
    from tests.reporting.test_hdf5 import write_log_and_die

    whole = tmp_path / "whole.h5"
    if writer == "finished":
        shutil.copy(tiny_logs[0], whole)
    else:
        write_log_and_die(whole)
    torn = tmp_path / "run" / "trajectory.h5"
    torn.parent.mkdir()
    torn.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cmd = [sys.executable, "-m", "fedmetanas.report", str(torn), "--out", str(tmp_path / "out"), "--read-timeout", "10"]
    t = time.time()

    proc = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=60)

    assert time.time() - t < 30
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(torn) in errors[0] and "truncated" in errors[0] and "Traceback" not in proc.stderr

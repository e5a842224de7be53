"""The pure parts of benchmarks/peers.py: the process-tree memory sampler (on a fake /proc and on this
process), the steady-round arithmetic and the table. No peers venv, no network, no runs: seconds."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.peers_memory import TreeSampler, list_procs, parse_stat, sample_tree, short_name, tree_members
from benchmarks.peers_stats import RunRecord, markdown_table, periods, steady, summarize


def fake_proc(root: Path, procs: dict[int, tuple[int, int, str, int, int]]) -> Path:
    """A /proc with pid -> (ppid, session, cmdline, VmRSS kB, Pss kB)."""
    for pid, (ppid, sid, cmd, rss, pss) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        # The command name may hold spaces and parentheses: the parser must cut at the last ')'.
        (d / "stat").write_text(f"{pid} (py (x) y) S {ppid} {sid} {sid} 0 -1 4194304 0 0\n")
        (d / "cmdline").write_bytes(cmd.replace(" ", "\0").encode() + b"\0")
        (d / "status").write_text(f"Name:\tpy\nVmPeak:\t 99999 kB\nVmRSS:\t {rss} kB\nThreads:\t1\n")
        (d / "smaps_rollup").write_text(f"00400000-7fff [rollup]\nRss:  {rss} kB\nPss:  {pss} kB\n")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


TREE = {
    100: (1, 100, "mpirun -np 2 python", 1000, 500),  # the run's root, its own session
    101: (100, 100, "python rank0", 2000, 1500),
    102: (101, 100, "raylet --session ray-abc", 300, 200),  # a grandchild
    103: (1, 100, "gcs_server", 400, 300),  # reparented to init, still in the run's session
    104: (1, 1, "sshd", 5000, 5000),  # unrelated
    105: (1, 7, "dashboard --session-dir ray-abc", 50, 40),  # left the session, but named by the marker
}


def test_sample_tree_sums_rss_and_pss_over_the_run_only(tmp_path: Path) -> None:
    # Prepare
    proc = fake_proc(tmp_path, TREE)
    known: dict[int, str] = {}
    # Execute
    s = sample_tree(100, known, proc, session=100)
    with_marker = sample_tree(100, {}, proc, session=100, marker="ray-abc")
    # Assert
    assert (s.rss_kib, s.pss_kib, s.procs) == (1000 + 2000 + 300 + 400, 500 + 1500 + 200 + 300, 4)
    assert set(known) == {100, 101, 102, 103}
    assert (with_marker.rss_kib, with_marker.procs) == (3700 + 50, 5)
    assert sample_tree(100, {}, proc, session=100, with_pss=False).pss_kib == -1
    assert sum(s.pss_by_name.values()) == s.pss_kib


def test_short_names_group_a_breakdown_by_role() -> None:
    assert short_name("ray::ClientAppActor") == "ray::ClientAppActor"
    assert short_name("/venv/bin/python -u /x/ray/_private/log_monitor.py --a") == "log_monitor.py"
    assert short_name("/venv/lib/ray/core/src/ray/raylet/raylet --x") == "raylet"
    assert short_name("") == "?"


def test_a_seen_process_stays_counted_after_reparenting_but_not_after_pid_reuse(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {100: (1, 100, "root", 10, 10), 101: (100, 100, "daemon", 20, 20)})
    known: dict[int, str] = {}
    sample_tree(100, known, proc)  # no session given: found as a child
    fake_proc(tmp_path, {101: (1, 55, "daemon", 20, 20)})  # double-forked: new parent, new session
    assert sample_tree(100, known, proc).rss_kib == 30
    fake_proc(tmp_path, {101: (1, 55, "someone else", 20, 20)})  # the pid now belongs to another program
    assert sample_tree(100, known, proc).rss_kib == 10


def test_parse_stat_cuts_at_the_last_parenthesis() -> None:
    assert parse_stat("42 (a) b) c) R 7 8 9 0") == (7, 9)


def test_tree_members_follows_descendants_of_this_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        assert child.pid in tree_members(list_procs(), os.getpid(), set())
    finally:
        child.kill()
        child.wait()


def test_sampler_on_this_process_sees_a_child_and_its_memory() -> None:
    own = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:")))
    with TreeSampler(os.getpid(), interval=0.02, pss_every=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.4)"])
        assert child.wait() == 0
    assert sampler.peak_procs >= 2
    assert sampler.peak_rss_kib > own
    assert 0 < sampler.peak_pss_kib <= sampler.peak_rss_kib
    assert sampler.samples >= 5 and 1 <= sampler.pss_samples <= sampler.samples
    assert child.pid in sampler.known  # it was seen ...
    # ... and is gone; the sampler never names its own process. (Other children of the test process, e.g.
    # another test's services in a full run, may still be alive: only these two are this test's business.)
    assert child.pid not in sampler.alive() and os.getpid() not in sampler.alive()


def test_steady_is_the_median_of_rounds_after_the_first() -> None:
    assert steady([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert steady([4.0]) == 4.0
    assert math.isnan(steady([]))
    assert periods([0.0, 1.0, 3.5]) == [1.0, 2.5]


def record(system: str, rep: int, round_s: list[float], wall: float, ok: bool = True) -> RunRecord:
    return RunRecord(system, 100, rep, ok=ok, error="" if ok else "error: unknown config key 'x|y'",
                     round_s=round_s, eval_s=[0.5] * len(round_s), round_start_s=[1.0, 3.0, 5.0][: len(round_s)],
                     startup_s=1.0, wall_s=wall, peak_rss_mib=1000.0, peak_pss_mib=800.0, final_acc=0.8)


def test_summary_takes_medians_over_repetitions_and_keeps_failures() -> None:
    runs = [record("flower", 0, [5.0, 2.0, 2.0], 20.0), record("flower", 1, [5.0, 4.0, 4.0], 30.0),
            record("ours-np2", 0, [1.0, 1.0, 1.0], 10.0), record("ours-np2", 1, [1.0, 1.0, 1.0], 14.0),
            record("ours-np2 runtime.x=1", 0, [], math.nan, ok=False)]
    summary = summarize(runs)
    assert summary[(100, "flower")]["steady_s"] == 3.0
    assert summary[(100, "flower")]["wall_s"] == 25.0
    assert summary[(100, "ours-np2")]["period_s"] == 2.0
    assert summary[(100, "ours-np2 runtime.x=1")]["reps"] == 0
    assert "unknown config key" in summary[(100, "ours-np2 runtime.x=1")]["error"]


def test_table_puts_the_ratio_to_flower_beside_each_value() -> None:
    runs = [record("flower", 0, [5.0, 2.0], 20.0), record("ours-np2", 0, [1.0, 1.0], 10.0),
            record("ours-np2 runtime.x=1", 0, [], math.nan, ok=False)]
    table = markdown_table(summarize(runs), order=["ours-np2", "flower"])
    lines = table.splitlines()
    ours = next(line for line in lines if line.startswith("| ours-np2 |"))
    flower = next(line for line in lines if line.startswith("| flower |"))
    assert lines.index(ours) < lines.index(flower)  # the given order
    assert "1.000 (0.50×)" in ours and "10.00 (0.50×)" in ours
    assert "×" not in flower
    assert "0.8000 (" not in ours  # accuracies carry no ratio
    failed = next(line for line in lines if line.startswith("| ours-np2 runtime.x=1 |"))
    assert "failed: error: unknown config key 'x/y'" in failed  # a '|' would break the table
    assert all(line.count("|") == lines[2].count("|") for line in (ours, flower, failed))


@pytest.mark.parametrize("value", [math.nan, None])
def test_a_missing_value_prints_as_na(value: float | None) -> None:
    from benchmarks.peers_stats import cell

    assert cell(value, "{:.2f}", 1.0) == "n/a"

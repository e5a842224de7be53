"""Peak memory of everything a run started: the sum of RSS and of PSS over its whole process tree.

A run is many processes (mpirun, its proxy and the ranks; Ray's GCS, raylet, dashboard and workers),
so the peak of one process says little. A sampler thread reads /proc every `interval` seconds, sums
VmRSS (/proc/PID/status) and Pss (/proc/PID/smaps_rollup) over the run's processes and keeps the peak of
each sum. RSS counts shared pages (the torch libraries every worker maps) once per process, so summed it
overstates; PSS splits each shared page among its sharers, so summed it is the memory the run really
holds. Both are reported.

A run's processes are the root's descendants, followed through reparenting: a process once seen in the
tree is counted until it exits even if its parent died (daemons that double-fork), plus any process in
the root's session (the root is started with `start_new_session`) and any whose command line contains a
marker (e.g. a Ray session directory unique to the run).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KIB_PER_MIB = 1024


@dataclass(frozen=True)
class ProcInfo:
    """What the sampler needs of one process."""

    pid: int
    ppid: int
    sid: int
    cmdline: str


def parse_stat(text: str) -> tuple[int, int]:
    """(ppid, session id) from the text of /proc/PID/stat; the command name may hold spaces and ')'."""
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[3])  # state ppid pgrp session ...


def parse_kib(text: str, key: str) -> int:
    """The value in kB of line `key:` in /proc/PID/status or smaps_rollup (0 if absent: kernel threads)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def list_procs(proc: Path = Path("/proc")) -> dict[int, ProcInfo]:
    """Every process visible under `proc` (those that exit while being read are skipped)."""
    out = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ppid, sid = parse_stat((proc / entry.name / "stat").read_text())
            cmdline = (proc / entry.name / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[pid] = ProcInfo(pid, ppid, sid, cmdline)
    return out


def tree_members(procs: dict[int, ProcInfo], root: int, known: set[int], session: int | None = None,
                 marker: str | None = None) -> set[int]:
    """The run's live processes: `root`, the still-living `known` ones, their descendants, the members
    of `session` and the processes whose command line contains `marker`."""
    members = {p for p in known | {root} if p in procs}
    members |= {p.pid for p in procs.values()
                if (session is not None and p.sid == session) or (marker and marker in p.cmdline)}
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    return members


def rss_kib(pid: int, proc: Path = Path("/proc")) -> int:
    """VmRSS of one process in KiB (cheap: /proc/PID/status); 0 if it exited meanwhile."""
    try:
        return parse_kib((proc / str(pid) / "status").read_text(), "VmRSS")
    except OSError:
        return 0


def pss_kib(pid: int, proc: Path = Path("/proc")) -> int:
    """Pss of one process in KiB from /proc/PID/smaps_rollup (the kernel walks the page tables: ~10 ms for
    a process that maps torch); 0 if it exited, or if not permitted."""
    try:
        return parse_kib((proc / str(pid) / "smaps_rollup").read_text(), "Pss")
    except OSError:
        return 0


@dataclass
class Sample:
    """One reading of the whole tree (pss_kib -1: not read this time)."""

    rss_kib: int
    pss_kib: int
    procs: int
    pss_by_name: dict[str, int] = field(default_factory=dict)  # PSS KiB per `short_name` (when read)


def sample_tree(root: int, known: dict[int, str], proc: Path = Path("/proc"), session: int | None = None,
                marker: str | None = None, with_pss: bool = True) -> Sample:
    """Sum RSS (and, `with_pss`, PSS; else -1) over the run's processes now; records the processes found
    in `known` (pid -> command line, so a pid the system reuses later is not taken for one of the run's)."""
    procs = list_procs(proc)
    live_known = {pid for pid, cmd in known.items() if pid in procs and procs[pid].cmdline == cmd}
    members = tree_members(procs, root, live_known, session, marker)
    rss, pss, by_name = 0, 0 if with_pss else -1, {}
    for pid in members:
        known[pid] = procs[pid].cmdline  # the latest: a process may exec after it was first seen
        rss += rss_kib(pid, proc)
        if with_pss:
            one = pss_kib(pid, proc)
            pss += one
            name = short_name(procs[pid].cmdline)
            by_name[name] = by_name.get(name, 0) + one
    return Sample(rss, pss, len(members), by_name)


def short_name(cmdline: str) -> str:
    """A process's name for a memory breakdown: Ray's `ray::Role`, a Python script's file name, or the
    program's name."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    script = next((w for w in words[1:] if w.endswith(".py")), None)
    if "python" in Path(words[0]).name and script:
        return Path(script).name
    return Path(words[0]).name


@dataclass
class TreeSampler:
    """Samples a run's process tree on a thread until `stop()`; keeps the peaks of the sums.

    RSS is read every `interval`; PSS (costly to read) whenever the RSS sum reaches a new high and at
    least every `pss_every` seconds: its peak is taken where the tree is largest, at a fraction of the
    cost (a process's PSS never exceeds its RSS, and a run's memory grows and shrinks with its RSS; a PSS
    peak that is not also an RSS high may be missed by up to `pss_every`).

    Use: `with TreeSampler(pid, session=pid) as s: proc.wait()`, then `s.peak_rss_mib`, `s.peak_pss_mib`.
    """

    root: int
    interval: float = 0.15
    pss_every: float = 1.0
    session: int | None = None
    marker: str | None = None
    proc: Path = Path("/proc")
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    peak_procs: int = 0
    peak_pss_by_name: dict[str, int] = field(default_factory=dict)  # the breakdown at the PSS peak
    samples: int = 0
    pss_samples: int = 0
    cpu_seconds: float = 0.0  # the sampler's own CPU time (its thread), so its cost is known
    known: dict[int, str] = field(default_factory=dict)  # every process of the run seen: pid -> cmdline
    _last_pss: float = field(default=-math.inf, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample_once(self) -> Sample:
        """Take one reading and fold it into the peaks."""
        rss = sample_tree(self.root, self.known, self.proc, self.session, self.marker, with_pss=False)
        s = rss
        if rss.rss_kib > self.peak_rss_kib or time.monotonic() - self._last_pss >= self.pss_every:
            s = sample_tree(self.root, self.known, self.proc, self.session, self.marker, with_pss=True)
            self._last_pss = time.monotonic()
            self.pss_samples += 1
            if s.pss_kib > self.peak_pss_kib:
                self.peak_pss_kib, self.peak_pss_by_name = s.pss_kib, s.pss_by_name
        self.peak_rss_kib = max(self.peak_rss_kib, rss.rss_kib, s.rss_kib)
        self.peak_procs = max(self.peak_procs, rss.procs, s.procs)
        self.samples += 1
        return s

    def _loop(self) -> None:
        t0 = time.thread_time()
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)
        self.cpu_seconds = time.thread_time() - t0

    def __enter__(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self._loop, name="peers-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def alive(self) -> list[int]:
        """The run's processes still alive now (after the root exited: leftovers to end), never this one."""
        procs = list_procs(self.proc)
        return sorted(pid for pid, cmd in self.known.items()
                      if pid in procs and procs[pid].cmdline == cmd and pid != os.getpid())

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / KIB_PER_MIB

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss_kib / KIB_PER_MIB

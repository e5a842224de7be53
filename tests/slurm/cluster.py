"""A throwaway one-node Slurm cluster (munged + slurmctld + slurmd on loopback) for tests.

Everything lives in a private temporary directory: its own munge key and socket, its own ports and
state, so it never touches /etc/slurm or a system munged. Needs root and Debian's `slurm-wlm` + `munge`.

    python -m tests.slurm.cluster up      # prints `export SLURM_CONF=...`; the daemons keep running
    python -m tests.slurm.cluster down DIR
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped; the message says which daemon and its log."""


def which(name: str) -> str | None:
    """The path of a Slurm/munge binary (daemons live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    """The binaries this cluster needs that are not installed (empty when it can run)."""
    return [name for name in DAEMONS if which(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mb() -> int:
    """A RealMemory below what the node has (slurmd drains a node that reports less than configured)."""
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.9)


# Character devices that stand in for GPUs: Slurm only needs distinct device files to count, allocate
# and bind them (CUDA_VISIBLE_DEVICES per task); CUDA itself sees no GPU, so the ranks compute on the CPU.
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


def slurm_conf(root: Path, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int, gpus: int = 0) -> str:
    """slurm.conf for one node on loopback: no cgroups/systemd, root daemons, private munge socket."""
    auth = f"socket={root / 'munge.sock'}"
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return "\n".join([
        "ClusterName=localtest",
        # Job ids (and so the MASTER_PORT derived from them) differ from one test cluster to the next.
        f"FirstJobId={random.randint(1000, 19000)}",
        *(["GresTypes=gpu"] if gpus else []),
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        # Slurm holds a requeued job for the credential lifetime + 1 s (default 120 s) so its old
        # credential cannot start it twice; 10 s keeps the preemption test short.
        f"AuthInfo=cred_expire=10,{auth}",
        "CredType=cred/munge",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2",  # start eligible jobs within ~2 s
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "KillWait=10",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}{gres} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    """Start, use and stop the one-node cluster; `env` is what clients (sbatch, squeue) need."""

    def __init__(self, root: Path | None = None, cpus: int | None = None, gpus: int = 0) -> None:
        # The munge socket's directory and all its parents must be world-executable, so not pytest's
        # 0700 tmp_path: a fresh directory directly under /tmp.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fedmetanas-slurm-"))
        self.root.chmod(0o755)
        self.cpus = cpus or os.cpu_count() or 1
        if gpus > len(FAKE_GPU_FILES):
            raise ClusterError(f"at most {len(FAKE_GPU_FILES)} fake GPUs (one per stand-in device file)")
        self.gpus = gpus
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Bring up munged, slurmctld and slurmd and wait until the node is idle."""
        if os.geteuid() != 0:
            raise ClusterError("the local Slurm cluster runs its daemons as root; run the tests as root")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.cpus, _memory_mb(), _free_port(), _free_port(), self.gpus))
        # gres.conf is read from slurm.conf's directory.
        (self.root / "gres.conf").write_text("".join(f"NodeName=localhost Name=gpu File={f}\n"
                                                     for f in FAKE_GPU_FILES[:self.gpus]))
        key = self.root / "munge.key"
        if not key.exists():
            subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._spawn("munged", [which("munged"), "--foreground", f"--socket={self.root / 'munge.sock'}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--seed-file={self.root / 'munged.seed'}", f"--log-file={self.root / 'munged.log'}"])
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged")
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout, "slurmd")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what still runs, `scontrol shutdown`, wait for the daemons' PIDs to exit, stop munged."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.cancel_all(timeout)  # slurmd's shutdown leaves running job steps behind
            subprocess.run([which("scontrol"), "shutdown"], env=self.env, capture_output=True, timeout=timeout,
                           check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if name == "munged":
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (`sbatch`, `squeue`, ...) against this cluster."""
        cmd = [which(args[0]) or args[0], *args[1:]]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job of this (private) cluster and wait until none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            if not jobs:
                return
            self.run("scancel", "--full", *jobs, check=False, timeout=10)
            time.sleep(0.5)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%t", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def job_field(self, job_id: str, field: str) -> str:
        """One field (`JobState`, `Restarts`, `ExitCode`, ...) of `scontrol show job` ('' once purged)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        return ""

    def logs(self) -> str:
        """The tail of each daemon's log, for a failure message."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # -- internals ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - closed when the process is reaped
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _wait(self, ready: Callable[[], bool], timeout: float, name: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for daemon, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{daemon} exited with {proc.returncode}; see {self.root}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {timeout:.0f} s; see {self.root}\n{self.logs()}")
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> int:
    """`up`: start a cluster and leave it running; `down DIR`: stop the one in DIR by its PID files."""
    if argv[:1] == ["up"]:
        cluster = LocalSlurm()
        cluster.start()
        for proc in cluster.procs.values():
            proc.returncode = 0  # detach: let the daemons outlive this process
        print(f"export SLURM_CONF={cluster.conf}  # stop with: python -m tests.slurm.cluster down {cluster.root}")
        return 0
    if argv[:1] == ["down"] and len(argv) == 2:
        root = Path(argv[1])
        env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        pids = {name: int((root / f"{name}.pid").read_text().split()[0])
                for name in ("slurmctld", "slurmd", "munged") if (root / f"{name}.pid").exists()}
        subprocess.run([which("scontrol"), "shutdown"], env=env, check=False)
        deadline = time.monotonic() + 30
        while any(_alive(pids[n]) for n in ("slurmctld", "slurmd") if n in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        if "munged" in pids and _alive(pids["munged"]):
            os.kill(pids["munged"], signal.SIGTERM)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

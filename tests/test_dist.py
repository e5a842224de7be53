"""Where a rank runs: rank/size/local rank from each launcher's variables, one GPU per local rank (or
`runtime.devices`), a backend every rank agrees on, and the same all-reduce whichever launcher started it."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmetanas import dist
from fedmetanas.dist import (
    DistError,
    Placement,
    device_for,
    expand_nodelist,
    first_host,
    init_distributed,
    placement_from_env,
    plan_backend,
    process_group_options,
    rendezvous_address,
    store_host,
    tasks_per_node,
)
from tests.helpers import MPIRUN, REPO

# --- rank, size and local rank from the launcher's environment ------------------------------------

# What each launcher puts in a rank's environment (trimmed to the variables that matter).
OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
HYDRA = {"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3", "PMI_FD": "6"}
# mpirun inside an sbatch job: every rank also inherits the launcher step's Slurm variables (all rank 0).
HYDRA_IN_SLURM = {**HYDRA, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "1",
                  "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "6", "SLURM_JOB_NODELIST": "n[1-2]"}
SRUN_PMIX = {"PMIX_RANK": "3", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}
SRUN_PMI2 = {"PMI_RANK": "2", "PMI_SIZE": "4", "PMI_FD": "11", "SLURM_PROCID": "2", "SLURM_STEP_ID": "0",
             "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
             "SLURM_NODEID": "1"}
SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
# The batch script itself: Slurm variables but no job step, so a plain `python` there is one process.
BATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "4"}


@pytest.mark.parametrize(("environ", "expected"), [
    (OPENMPI, Placement(3, 8, 1, 4, "mpi")),
    (HYDRA, Placement(5, 6, 2, 3, "mpi")),
    (HYDRA_IN_SLURM, Placement(5, 6, 2, 3, "mpi")),
    (SRUN_PMIX, Placement(3, 4, 1, 2, "mpi")),
    (SRUN_PMI2, Placement(2, 4, 0, 2, "mpi")),
    (SRUN, Placement(5, 8, 1, 4, "srun")),
    (BATCH_SHELL, Placement(0, 1, 0, 1, "none")),
    ({}, Placement(0, 1, 0, 1, "none")),
], ids=["openmpi", "mpich-hydra", "mpirun-inside-slurm", "srun-pmix", "srun-pmi2", "srun-no-mpi", "batch-shell",
        "plain"])
def test_each_launcher_s_variables_give_rank_size_and_local_rank(environ: dict[str, str],
                                                                 expected: Placement) -> None:
    assert placement_from_env(environ) == expected


def test_a_launcher_that_does_not_say_what_is_local_is_taken_as_one_node() -> None:
    assert placement_from_env({"PMI_RANK": "2", "PMI_SIZE": "3"}) == Placement(2, 3, 2, 3, "mpi")


def test_slurm_s_compressed_task_counts_expand_per_node() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    with pytest.raises(DistError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("two")


def test_a_garbled_rank_variable_is_named() -> None:
    with pytest.raises(DistError, match="PMI_RANK='x'"):
        placement_from_env({"PMI_RANK": "x", "PMI_SIZE": "2"})


# --- node lists and the srun rendezvous -----------------------------------------------------------

NODELISTS = {
    "localhost": ["localhost"],
    "node[1-3,5]": ["node1", "node2", "node3", "node5"],
    "gpu[007-009],login1": ["gpu007", "gpu008", "gpu009", "login1"],
    "login1,gpu[3,1-2]": ["login1", "gpu3", "gpu1", "gpu2"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
}


@pytest.mark.parametrize("spec", list(NODELISTS))
def test_node_lists_expand_in_slurm_s_order(spec: str) -> None:
    assert expand_nodelist(spec) == NODELISTS[spec]
    assert first_host(spec) == NODELISTS[spec][0]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's scontrol (apt-get install slurm-client)")
def test_the_parser_agrees_with_scontrol_show_hostnames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "slurm.conf"  # scontrol reads a config even to expand a host list; no daemon needed
    conf.write_text("ClusterName=parse\nSlurmctldHost=localhost\nNodeName=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    for spec, hosts in NODELISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True, text=True, check=True)
        assert out.stdout.split() == hosts
        assert first_host(spec, shutil.which("scontrol")) == hosts[0]


def test_a_node_list_that_cannot_be_parsed_asks_for_master_addr() -> None:
    with pytest.raises(DistError, match="MASTER_ADDR"):
        expand_nodelist("node[a-c]")


def test_srun_ranks_meet_on_the_step_s_first_node_at_a_port_from_the_job_id() -> None:
    assert rendezvous_address(SRUN) == ("gpu07", 29500 + 4242)
    assert rendezvous_address({**SRUN, "SLURM_JOB_ID": "123456"})[1] == 29500 + 123456 % 20000


def test_master_addr_and_port_override_the_derived_address() -> None:
    assert rendezvous_address({**SRUN, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "12345"}) == ("10.0.0.9", 12345)


def test_runtime_master_addr_overrides_master_addr_under_srun() -> None:
    assert rendezvous_address({**SRUN, "MASTER_ADDR": "10.0.0.9"}, master_addr="ib-gpu07")[0] == "ib-gpu07"


# --- where MPI ranks meet rank 0's store ----------------------------------------------------------

# A Debian/Ubuntu node: /etc/hosts maps its own name to 127.0.1.1; DNS knows its real address.
DEBIAN = {"gpu07": ["127.0.1.1"]}
RESOLVES = {"gpu07": ["127.0.1.1", "10.1.2.7"]}


def _resolver(table: dict[str, list[str]]):
    return lambda name: table.get(name, [])


def test_mpi_ranks_on_one_node_meet_on_loopback() -> None:
    assert store_host({}, None, True, "gpu07", _resolver(DEBIAN)) == "127.0.0.1"


def test_mpi_ranks_on_several_nodes_use_rank_0_s_first_address_that_is_not_loopback() -> None:
    assert store_host({}, None, False, "gpu07", _resolver(RESOLVES)) == "10.1.2.7"


def test_a_host_name_that_resolves_only_to_127_0_1_1_is_sent_as_the_name() -> None:
    # The other nodes resolve it through their DNS; 127.0.1.1 would send them to themselves and hang.
    assert store_host({}, None, False, "gpu07", _resolver(DEBIAN)) == "gpu07"
    assert store_host({}, None, False, "gpu07", _resolver({})) == "gpu07"


def test_master_addr_and_then_runtime_master_addr_override_the_derived_store_host() -> None:
    env = {"MASTER_ADDR": "10.9.9.9"}
    assert store_host(env, None, False, "gpu07", _resolver(RESOLVES)) == "10.9.9.9"
    assert store_host(env, None, True, "gpu07", _resolver(RESOLVES)) == "10.9.9.9"
    assert store_host(env, "ib-gpu07", False, "gpu07", _resolver(RESOLVES)) == "ib-gpu07"


def test_nccl_is_bound_to_the_rank_s_gpu_at_init_and_gloo_gets_no_device() -> None:
    gpu = torch.device("cuda", 2)
    assert process_group_options("nccl", gpu) == {"device_id": gpu}
    assert process_group_options("gloo", gpu) == {}
    assert process_group_options("gloo", torch.device("cpu")) == {}


@pytest.mark.parametrize(("environ", "field"), [
    ({"SLURM_PROCID": "0"}, "MASTER_ADDR"),
    ({**SRUN, "MASTER_PORT": "99999"}, "MASTER_PORT"),
    ({**SRUN, "MASTER_PORT": "http"}, "MASTER_PORT"),
])
def test_an_unusable_rendezvous_is_one_sentence_naming_the_variable(environ: dict[str, str], field: str) -> None:
    with pytest.raises(DistError) as err:
        rendezvous_address(environ)
    assert field in str(err.value) and "\n" not in str(err.value)


# --- devices --------------------------------------------------------------------------------------

def test_without_gpus_every_rank_computes_on_the_cpu() -> None:
    assert {device_for("auto", r, 4, 0) for r in range(4)} == {torch.device("cpu")}
    assert device_for("cpu", 0, 1, 8) == torch.device("cpu")


def test_cuda_asked_for_without_a_gpu_is_an_error_naming_runtime_device() -> None:
    with pytest.raises(DistError, match=r"runtime\.device: cuda was requested but no GPU is visible"):
        device_for("cuda", 0, 1, 0)
    with pytest.raises(DistError, match=r"runtime\.devices lists GPU ids but no GPU is visible"):
        device_for("auto", 0, 1, 0, devices=(0,))


def test_two_ranks_on_four_gpus_get_a_gpu_each() -> None:
    picked = [device_for("auto", r, 2, 4) for r in range(2)]
    assert picked == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert plan_backend([("node", f"GPU-{d.index}") for d in picked]) == ("nccl", None)


def test_four_ranks_on_two_gpus_share_them_use_gloo_and_warn() -> None:
    picked = [device_for("cuda", r, 4, 2) for r in range(4)]
    assert [d.index for d in picked] == [0, 1, 0, 1]
    backend, warning = plan_backend([("node7", f"GPU-{d.index}") for d in picked])
    assert backend == "gloo"  # NCCL refuses two ranks on one GPU
    assert "ranks 0, 2" in warning and "ranks 1, 3" in warning and "node7" in warning
    assert "runtime.devices" in warning and "--ntasks-per-node" in warning


def test_slurm_s_one_gpu_per_task_is_not_sharing_although_each_rank_sees_gpu_0() -> None:
    # --gpus-per-task=1: every rank sees one GPU as cuda:0, but they are different physical GPUs.
    picked = [device_for("auto", r, 4, 1) for r in range(4)]
    assert picked == [torch.device("cuda", 0)] * 4
    assert plan_backend([("node", f"GPU-uuid-{r}") for r in range(4)]) == ("nccl", None)


def test_ranks_on_cpus_use_gloo_and_a_mix_of_cpu_and_gpu_ranks_warns() -> None:
    assert plan_backend([("a", ""), ("a", "")]) == ("gloo", None)
    backend, warning = plan_backend([("a", ""), ("b", "GPU-1")])
    assert backend == "gloo" and "runtime.device" in warning


def test_runtime_devices_picks_each_local_rank_s_gpu() -> None:
    assert [device_for("auto", r, 2, 4, devices=(3, 1)) for r in range(2)] == [torch.device("cuda", 3),
                                                                             torch.device("cuda", 1)]


@pytest.mark.parametrize(("devices", "needle"), [
    ((0,), "runtime.devices lists 1 GPU id(s) but 2 ranks run on this node"),
    ((0, 4), "runtime.devices names GPU [4] but this rank sees 4 GPU(s)"),
])
def test_a_runtime_devices_list_that_does_not_fit_the_node_is_refused(devices: tuple[int, ...], needle: str) -> None:
    for rank in range(2):  # every rank fails the same way, not only the one whose id is wrong
        with pytest.raises(DistError) as err:
            device_for("auto", rank, 2, 4, devices=devices)
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_runtime_devices_is_validated_by_the_config() -> None:
    from fedmetanas.config import ConfigError
    from fedmetanas.configure import load_config

    assert load_config(None, ["runtime.devices=[2, 0]"]).runtime.devices == (2, 0)
    for bad in ("runtime.devices=[]", "runtime.devices=[-1]", "runtime.devices=1"):
        with pytest.raises(ConfigError, match=r"runtime\.devices"):
            load_config(None, [bad])


# --- the process group ----------------------------------------------------------------------------

LAUNCH_VARS = ("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_", "SLURM_", "MASTER_")


def _clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}


def test_init_distributed_alone_is_world_one_and_safe_to_call_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(LAUNCH_VARS):
            monkeypatch.delenv(key)
    ctx = init_distributed("cpu", 1, 30.0)
    try:
        assert init_distributed("cpu", 1, 30.0) is ctx
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (0, 1, 0, "gloo")
        buf = torch.arange(4, dtype=torch.float64)
        assert torch.equal(ctx.all_reduce_sum(buf.clone()), buf)
        timed = buf.clone()
        assert ctx.timed_all_reduce_sum(timed) >= 0 and torch.equal(timed, buf)
        assert ctx.side_group is None and ctx.all_gather_objects("x") == ["x"]
    finally:
        dist.shutdown()
        torch.set_num_threads(1)


# One rank's work for the multi-process tests: join, all-reduce a float64 buffer whose entries span
# 16 orders of magnitude, save what this rank ended with.
WORKER = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from fedmetanas.dist import init_distributed, shutdown
device, out, devices = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = init_distributed(device, 1, 60.0, devices)
assert init_distributed(device, 1, 60.0, devices) is ctx
gen = torch.Generator().manual_seed(1000 + ctx.rank)
buf = torch.randn(4096, generator=gen, dtype=torch.float64) * torch.logspace(-8, 8, 4096, dtype=torch.float64)
total = ctx.all_reduce_sum(buf.to(ctx.device)).cpu()
torch.save({{"sum": total, "rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank,
            "backend": ctx.backend, "device": str(ctx.device)}}, f"{{out}}.{{ctx.rank}}.pt")
shutdown()
"""


def _expected_sum(world: int) -> torch.Tensor:
    parts = [torch.randn(4096, generator=torch.Generator().manual_seed(1000 + r), dtype=torch.float64)
             * torch.logspace(-8, 8, 4096, dtype=torch.float64) for r in range(world)]
    return sum(parts[1:], parts[0])


def _results(out: Path, world: int) -> list[dict]:
    return [torch.load(f"{out}.{r}.pt") for r in range(world)]


def _worker_cmd(tmp_path: Path, device: str, out: Path, devices: str = "null") -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    return [sys.executable, str(script), device, str(out), devices]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_like_srun(cmd: list[str], world: int, extra: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `world` tasks with the variables `srun --mpi=none -n world` gives them on one node."""
    procs = []
    port = str(_free_port())
    for rank in range(world):
        env = dict(_clean_env(), OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(world), SLURM_STEP_TASKS_PER_NODE=str(world),
                   SLURM_NODEID="0", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        env.update(extra or {})
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_all(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]


def test_tasks_started_by_srun_without_mpi_meet_through_the_derived_address(tmp_path: Path) -> None:
    out = tmp_path / "srun"
    _wait_all(_run_like_srun(_worker_cmd(tmp_path, "cpu", out), 2))
    results = _results(out, 2)
    placed = [(r["rank"], r["world"], r["local"], r["backend"]) for r in results]
    assert placed == [(0, 2, 0, "gloo"), (1, 2, 1, "gloo")]
    for r in results:
        assert torch.equal(r["sum"], _expected_sum(2))  # two addends: exact in any order


@pytest.mark.mpi
def test_mpirun_and_srun_give_the_same_all_reduce(tmp_path: Path) -> None:
    mpi_out, srun_out = tmp_path / "mpi", tmp_path / "srun"
    proc = subprocess.run([str(MPIRUN), "-np", "2", *_worker_cmd(tmp_path, "cpu", mpi_out)], env=_clean_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _wait_all(_run_like_srun(_worker_cmd(tmp_path, "cpu", srun_out), 2))
    for a, b in zip(_results(mpi_out, 2), _results(srun_out, 2)):
        assert torch.equal(a["sum"], b["sum"]) and a["rank"] == b["rank"]


def test_an_address_rank_0_cannot_bind_names_the_address_and_a_taken_port_names_the_port() -> None:
    """Issue 21: both used to read "MASTER_PORT: rank 0 cannot listen ..." after c10d's connect retries."""
    assert "runtime.master_addr: rank 0 cannot listen on 0.0.0.1" in (
        dist.listen_problem("0.0.0.1", 0, "runtime.master_addr") or "")
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))  # another loopback address: any 127.x is this host's
        busy.listen()
        problem = dist.listen_problem("127.0.0.2", busy.getsockname()[1], "MASTER_ADDR") or ""
    assert problem.startswith("MASTER_PORT: rank 0 cannot listen on 127.0.0.2:") and "port in use" in problem
    assert dist.listen_problem("127.0.0.2", 0, "MASTER_ADDR") is None
    with pytest.raises(dist.DistError, match="runtime.master_addr"):
        dist._store(0, 2, "0.0.0.1", 0, datetime.timedelta(seconds=5), "runtime.master_addr")


def test_a_busy_master_port_is_an_error_naming_master_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        procs = _run_like_srun(_worker_cmd(tmp_path, "cpu", tmp_path / "x"), 2,
                               {"MASTER_PORT": str(busy.getsockname()[1])})
        procs[1].kill()  # rank 1 would wait for rank 0's store until the timeout
        _, err = procs[0].communicate(timeout=120)
        procs[1].wait()
    assert procs[0].returncode != 0 and "DistError: MASTER_PORT: rank 0 cannot listen" in err


# A rank that never reaches the all-reduce: rank 0 must name it within the timeout, through the gloo
# side group (the path every backend takes, NCCL included).
HANG_WORKER = """
import os, sys, time, torch
import torch.distributed as tdist
sys.path.insert(0, {repo!r})
from fedmetanas.dist import CollectiveError, init_distributed
ctx = init_distributed(sys.argv[1], 1, 60.0)
print("backend", ctx.backend, flush=True)
assert tdist.get_backend(ctx.side_group) == "gloo"
assert ctx.all_gather_objects(ctx.rank) == [0, 1]
ctx.timeout_s = 3.0
if ctx.rank == 1:
    time.sleep(60)  # hangs in its local work
    os._exit(0)
start = time.time()
try:
    ctx.all_reduce_sum(torch.ones(3, device=ctx.device))
except CollectiveError as err:
    print(f"error after {{time.time() - start:.1f}} s: {{err}}", flush=True)
    os._exit(4)
os._exit(0)
"""


def _hung_rank(tmp_path: Path, device: str) -> str:
    """Rank 0's output when rank 1 hangs; asserts it left with code 4 naming rank 1 within the timeout."""
    script = tmp_path / "hang.py"
    script.write_text(HANG_WORKER.format(repo=str(REPO)))
    procs = _run_like_srun([sys.executable, str(script), device], 2)
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 4, err[-3000:]
    seconds = float(out.split("error after ")[1].split(" s")[0])
    assert "rank 1 did not reach the round's all-reduce within 3 s" in out and seconds < 20
    return out


def test_a_hung_rank_is_named_by_rank_0_through_the_gloo_side_group(tmp_path: Path) -> None:
    assert "backend gloo" in _hung_rank(tmp_path, "cpu")


# --- on GPUs --------------------------------------------------------------------------------------

CUDA_COUNT = torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.skipif(CUDA_COUNT < 2, reason=f"needs 2 CUDA GPUs (NCCL puts one rank per GPU); {CUDA_COUNT} visible")
def test_an_nccl_all_reduce_of_float64_across_two_ranks_equals_gloo_s(tmp_path: Path) -> None:
    results = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        proc = subprocess.run([str(MPIRUN), "-np", "2", *_worker_cmd(tmp_path, device, out)], env=_clean_env(),
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[device] = _results(out, 2)
    assert [r["backend"] for r in results["cuda"]] == ["nccl", "nccl"]
    assert [r["device"] for r in results["cuda"]] == ["cuda:0", "cuda:1"]
    for gpu, cpu in zip(results["cuda"], results["cpu"]):
        assert torch.equal(gpu["sum"], cpu["sum"])  # two addends: the sum is exact in any order


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.skipif(CUDA_COUNT < 1, reason="needs a CUDA GPU")
def test_two_ranks_on_one_gpu_fall_back_to_gloo_warn_and_sum_correctly(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    proc = subprocess.run([str(MPIRUN), "-np", "2", *_worker_cmd(tmp_path, "cuda", out, "[0, 0]")],
                          env=_clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out, 2)
    assert [(r["backend"], r["device"]) for r in results] == [("gloo", "cuda:0")] * 2
    for r in results:
        assert torch.equal(r["sum"], _expected_sum(2))
    assert proc.stderr.count("NCCL cannot put two ranks on one GPU") == 1  # once, from rank 0


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_COUNT < 2, reason=f"needs 2 CUDA GPUs (NCCL puts one rank per GPU); {CUDA_COUNT} visible")
def test_on_nccl_a_hung_rank_is_named_within_the_timeout_too(tmp_path: Path) -> None:
    assert "backend nccl" in _hung_rank(tmp_path, "cuda")

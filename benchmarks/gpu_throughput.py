"""gpu_check's throughput sections that call the per-client benchmarks as subprocesses and read their JSON:

- `peers_cnn`: the peers workload's model (FedAvg on the FedAvg paper's CNN), clients/s sequential vs a
  batch of 10 (benchmarks/clients_batched.py);
- `kernels`: CUDA kernels, GPU busy time and its share of the wall time per client meta-step on the
  default search's supernet, sequential vs a batch of 10, both relaxations (benchmarks/kernels.py);
- `paper`: the paper-size supernet (dense soft, as configs/paper/* search) client-steps/s sequential vs a
  batch of 10, and its peak memory at a batch of 1 and 2: bytes per batched client and the largest batch
  in 80% of the device (benchmarks/kernels.py --memory).

Each passes what is left of the section's budget to the benchmark (`--budget-s`), so a slow one stops
between measurements and its partial JSON still arrives.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gpu_common import REPO, SectionContext, SectionTimeout, run_bounded

KILL_RESERVE_S = 5.0  # of the budget left to a benchmark's own --budget-s: time to write its JSON and exit


def _benchmark(ctx: SectionContext, script: str, args: list[str], name: str, budgeted: bool = True) -> dict[str, Any]:
    """Run benchmarks/`script` with `args` and `--json`, return its figures (a timeout if it wrote none)."""
    out = ctx.out_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    budget = ["--budget-s", f"{max(ctx.deadline.left() - KILL_RESERVE_S, 1.0):.0f}"] if budgeted else []
    done = run_bounded([sys.executable, str(REPO / "benchmarks" / script), *args, *budget, "--json", str(out)],
                       ctx.deadline)
    figures = json.loads(out.read_text()) if out.exists() else None
    if done.timed_out and figures is None:
        raise SectionTimeout(f"{script} outlived the budget before writing figures")
    if done.returncode != 0 and not done.timed_out:
        raise RuntimeError(f"{script} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    if figures is None:
        raise RuntimeError(f"{script} ended without writing {out}")
    if done.timed_out:
        figures["status"] = "timeout"
    return figures


def peers_cnn(ctx: SectionContext) -> dict[str, Any]:
    """FedAvg CNN clients/s, sequential vs batch 10 (10 clients of a round on one lane)."""
    args = ["--workloads", "fedavg_cnn", "--clients", "10", "--batches", "10", "--repeats", "1" if ctx.quick else "3",
            "--device", ctx.device]
    figures = _benchmark(ctx, "clients_batched.py", args, "peers_cnn", budgeted=False)
    cnn = figures["workloads"].get("fedavg_cnn", {})
    ctx.record.update(clients=figures["clients"], sequential=cnn.get("sequential"), batched=cnn.get("batch 10"),
                      batch=10)
    return {"status": figures.get("status", "ok")}


def _rows(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kernels.py's rows by "mode/variant" ("soft_top2/sequential", "hard/batch 10", ...)."""
    return {f"{r['mode']}/{r['variant']}": r for r in figures["rows"]}


def kernels(ctx: SectionContext) -> dict[str, Any]:
    """Per client meta-step of the default search's supernet: CUDA kernels, GPU busy ms and share of the
    wall time, client-steps/s; sequential vs batch 10 (2 on a quick run); soft top-2 and hard."""
    batch = 2 if ctx.quick else 10
    args = ["--nets", "default", "--batches", str(batch), "--repeats", "1", "--device", ctx.device]
    figures = _benchmark(ctx, "kernels.py", args + (["--quick"] if ctx.quick else []), "kernels")
    ctx.record.update(batch=batch, rows=_rows(figures))
    return {"status": figures.get("status", "ok")}


def paper(ctx: SectionContext) -> dict[str, Any]:
    """The paper-size supernet, dense soft: client-steps/s sequential vs batch 10 (timed only: its kernels
    are counted by the kernels section's net and docs/batched.md), and memory per batched client."""
    batch = 2 if ctx.quick else 10
    args = ["--nets", "paper", "--modes", "soft_dense", "--batches", str(batch), "--repeats", "1", "--no-ops",
            "--memory", "--paper-ops-only", "false", "--device", ctx.device] + (["--quick"] if ctx.quick else [])
    figures = _benchmark(ctx, "kernels.py", args, "paper")
    memory = figures.get("memory") or [{}]
    size = "8x8, batch 16" if ctx.quick else "32x32, batch 64"
    ctx.record.update(batch=batch, rows=_rows(figures), memory=memory[0],
                      net=f"C16, 8 cells, 4 nodes, DARTS's 8 ops, {size}")
    return {"status": figures.get("status", "ok")}

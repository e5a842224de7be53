"""The GPU check's measurements (issues 13 and 20): correctness first, throughput after, each section in
its own time budget, so that `benchmarks/gpu_check.sh` fits 8 minutes on one GPU and reaches every section.

Each section runs in a child process (`gpu_check.py section ...`) with a deadline. A child because a
section that outlives its budget can then be killed without taking the others down, a CUDA error in one
cannot poison the next one's context, and each measures its own peak memory. A child records its figures
as it goes (gpu_common.Record), so a killed one still leaves what it measured; its status is then
`timeout` and the next section starts. This parent never imports torch: a CUDA context of its own would
hold GPU memory through every measurement.

    .venv/bin/python benchmarks/gpu_check.py [--out runs/gpu_check] [--device cuda]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick      # a dry run of every section on a CPU
    .venv/bin/python benchmarks/gpu_check.py --only resume syncs       # some sections (device always runs)

Writes OUT/gpu_check.json: the device, each section's status (ok, failed, error, timeout, unavailable),
seconds, budget and figures; benchmarks/gpu_report.py renders it as one table. Needs no network: the runs
read the Fashion-MNIST that `make data` leaves in data/, the rest uses synthetic tensors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling gpu_* modules

from gpu_common import (  # noqa: E402
    REPO,
    Deadline,
    Record,
    SectionContext,
    SectionTimeout,
    child_env,
    kill_group,
    run_bounded,
    write_json,
)

SCRIPT_LIMIT_S = 480.0  # gpu_check.sh on one GPU, the machine's start not included (issue 20)
# Not given to any section: the shell and the report, and each section's child start-up beyond its budget.
STARTUP_MARGIN_S = 30.0
# A CPU dry run's budgets: torch starts ~5x slower on a shared 2-core machine than on the GPU host, and the
# dry run checks that every section runs, not how fast (its total is no GPU figure).
CPU_BUDGET_SCALE = 3.0
CHILD_RESERVE_S = 2.0  # a child's own deadline comes this much before its kill, to write what it has


@dataclass(frozen=True)
class Section:
    """One part of the check: its budget on one GPU, the function a child runs, and whether it checks
    correctness (cheap: first) or measures throughput (slow: after every check)."""

    name: str
    budget_s: float
    runner: str  # "module:function" among benchmarks/gpu_*.py, called with a SectionContext
    kind: str  # "check" or "measure"
    what: str


# The order is the priority: a check that no measurement may crowd out comes first. The budgets were set
# from the 2026-12-04 H200 figures (docs/gpu.md: pytest -m gpu ~30 s, default search ~20 s
# a round sequentially, paper-size step 507 ms); the throughput sections' are estimates, read after a run
# as each section's `seconds` in gpu_check.json.
SECTIONS: tuple[Section, ...] = (
    Section("device", 15, "gpu_lanes:device_info", "check", "the GPU, its memory, torch and CUDA versions"),
    Section("resume", 40, "gpu_runs:check_resume", "check", "a run SIGKILLed after a checkpoint resumes bit-identical"),
    Section("lanes", 20, "gpu_lanes:check_lanes", "check", "1 vs 4 lanes torch.equal, hard and soft"),
    Section("syncs", 20, "gpu_lanes:check_syncs", "check", "host-device syncs per local step"),
    Section("shared", 25, "gpu_runs:check_shared", "check", "two ranks on one GPU (gloo) equal one rank"),
    Section("pytest_gpu", 45, "gpu_check:pytest_gpu", "check", "pytest -m gpu"),
    Section("peers_cnn", 15, "gpu_throughput:peers_cnn", "measure", "FedAvg CNN clients/s, sequential vs batched"),
    Section("kernels", 40, "gpu_throughput:kernels", "measure", "CUDA kernels and GPU busy per client-step"),
    Section("paper", 45, "gpu_throughput:paper", "measure", "paper-size client-steps/s; memory per batched client"),
    Section("default_batched", 30, "gpu_runs:default_batched", "measure", "default search s/round, batched"),
    Section("default_captured", 30, "gpu_runs:default_captured", "measure", "default search s/round, captured"),
    Section("default_sequential", 65, "gpu_runs:default_sequential", "measure", "default search s/round, sequential"),
    Section("step", 25, "gpu_lanes:check_step", "measure", "paper-size step on 1 vs 4 lanes"),
    Section("e2e", 35, "gpu_runs:check_e2e", "measure", "2-round runs on 1 and 4 lanes"),
)
BY_NAME = {s.name: s for s in SECTIONS}
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def pytest_gpu(ctx: SectionContext) -> dict[str, Any]:
    """`pytest -m gpu` over tests/ (on a CPU every test skips), its output kept in OUT/pytest_gpu.txt."""
    done = run_bounded([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                       ctx.deadline)
    (ctx.out_dir / "pytest_gpu.txt").write_text(done.stdout + done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    ctx.record["summary"] = lines[-1] if lines else ""
    ctx.record["counts"] = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                            for n, kind in PYTEST_COUNT.findall(ctx.record["summary"])}
    if done.timed_out:
        raise SectionTimeout("pytest -m gpu outlived the budget")
    return {"status": "ok" if done.returncode == 0 else "failed"}


# -- the child: one section ---------------------------------------------------------------------


def section_main(argv: list[str]) -> int:
    """Run one section's function in this process and leave its result (with a status) in --result."""
    p = argparse.ArgumentParser(prog="gpu_check.py section")
    p.add_argument("--runner", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    record = Record(Path(args.result))
    ctx = SectionContext(args.device, args.quick, Path(args.out), Deadline(args.deadline), record, args.repeats)
    try:
        module, function = args.runner.split(":")
        figures = getattr(importlib.import_module(module), function)(ctx)
        status = figures.pop("status", "ok")
        record.update(figures)
    except SectionTimeout as err:
        status, record["why"] = "timeout", str(err)
    except Exception as err:  # noqa: BLE001 - a failed section is reported, the others still run
        traceback.print_exc()
        status, record["error"] = "error", f"{type(err).__name__}: {err}"[-600:]
    record["status"] = status
    return 0


# -- the parent: every section in order, each within its budget ----------------------------------


def run_section(section: Section, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One section in a child process, killed at its budget; its recorded figures, status and seconds."""
    budget = section.budget_s * args.budget_scale
    result = out_dir / "sections" / f"{section.name}.json"
    result.unlink(missing_ok=True)
    start = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "section", "--runner", section.runner,
           "--result", str(result), "--deadline", f"{start + budget - CHILD_RESERVE_S:.3f}", "--device", args.device,
           "--out", str(out_dir), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), start_new_session=True)
    killed = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace_s=0.0)
        killed = True
    try:
        res: dict[str, Any] = json.loads(result.read_text())
    except (OSError, ValueError):
        res = {}
    if killed:
        res.update(status="timeout", why=f"killed at its budget of {budget:.0f} s")
    elif "status" not in res:
        res.update(status="error", error=f"the section's process exited {proc.returncode} without a result")
    res.update(seconds=round(time.time() - start, 1), budget_s=budget)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["section"]:
        return section_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of every section)")
    p.add_argument("--repeats", type=int, default=5, help="lanes: torch.equal repeats per relaxation")
    p.add_argument("--only", nargs="*", choices=list(BY_NAME), default=list(BY_NAME))
    p.add_argument("--budget-scale", type=float, default=None,
                   help=f"multiply every section's budget (default 1 on a GPU, {CPU_BUDGET_SCALE:g} on a CPU)")
    args = p.parse_args(argv)
    if args.budget_scale is None:
        args.budget_scale = 1.0 if args.device == "cuda" else CPU_BUDGET_SCALE
    out_dir = Path(args.out).resolve()
    for stale in ("runs", "sections"):  # a section must never read an earlier check's run or result
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    (out_dir / "sections").mkdir(parents=True, exist_ok=True)
    start = time.time()
    selected = [s for s in SECTIONS if s.name == "device" or s.name in args.only]
    results: dict[str, Any] = {
        "device_type": args.device, "device": None, "quick": args.quick, "argv": argv,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "limit_s": SCRIPT_LIMIT_S,
        "budget_total_s": sum(s.budget_s for s in selected) * args.budget_scale,
        "order": [s.name for s in selected], "sections": {}}
    for section in selected:
        print(f"== {section.name} (budget {section.budget_s * args.budget_scale:.0f} s): {section.what}", flush=True)
        res = run_section(section, args, out_dir)
        results["sections"][section.name] = res
        results["total_s"] = round(time.time() - start, 1)
        write_json(out_dir / "gpu_check.json", results)
        print(f"[{section.name}] {res['status']} in {res['seconds']} s"
              + (f": {res.get('error') or res.get('why')}" if res["status"] not in ("ok",) else ""), flush=True)
        if section.name == "device":  # what answered, not what was asked for
            results.update(device=res.get("device"), torch=res.get("torch"), cuda=res.get("cuda"),
                           device_type=res.get("device_type", "unknown"))
            if args.device == "cuda" and res.get("device_type") != "cuda":
                print("error: --device cuda but no GPU answered (see the device section above); "
                      "use --device cpu --quick for a dry run", file=sys.stderr)
                write_json(out_dir / "gpu_check.json", results)
                return 2
    write_json(out_dir / "gpu_check.json", results)
    bad = [n for n, r in results["sections"].items() if r["status"] not in ("ok", "unavailable")]
    print(f"total {results['total_s']} s of a {SCRIPT_LIMIT_S:.0f} s limit; "
          + (f"not ok: {', '.join(bad)}" if bad else "every section ok or unavailable"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/gpu_report.py renders gpu_check.json as one table and writes it into docs/gpu.md between two
markers; benchmarks/gpu_check.py runs its sections in order, each within a budget that fits the 8-minute
limit. No GPU and no torch: synthetic JSON written here, and stand-in sections that only sleep."""

from __future__ import annotations

import argparse
import ast
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_check import SCRIPT_LIMIT_S, SECTIONS, STARTUP_MARGIN_S, Section, run_section
from benchmarks.gpu_report import BEGIN, END, main, render

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def gpu_results() -> dict[str, Any]:
    """A complete gpu_check.json of a full GPU run. The numbers are made up for the test, not measured."""
    def row(mode: str, variant: str, kernels: float, busy_ms: float, cps: float, speed: float) -> dict[str, Any]:
        return {"mode": mode, "variant": variant, "kernels": kernels, "gpu_busy_ms": busy_ms,
                "gpu_busy_share": busy_ms / 1e3 * cps, "client_steps_per_s": cps, "speed_vs_sequential": speed}

    def default(soft: float, hard: float, k: int) -> dict[str, Any]:
        return {"status": "ok", "s_per_round_soft_top2": soft, "s_per_round_hard": hard,
                "s_per_round": (soft + hard) / 2, "client_batch_by_round": [k, k, k]}

    return {
        "device_type": "cuda", "device": "Test GPU", "torch": "9.9", "cuda": "99.0", "quick": False,
        "argv": [], "date": "2000-01-01 00:00 UTC", "limit_s": 480.0, "total_s": 400.0,
        "order": [s.name for s in SECTIONS],
        "sections": {
            "device": {"status": "ok", "device": "Test GPU", "total_memory_gib": 100.0},
            "resume": {"status": "ok", "bit_identical": True, "killed_inside_the_run": True},
            "lanes": {"status": "ok", "hard": {"equal": 5, "repeats": 5}, "soft": {"equal": 5, "repeats": 5}},
            "syncs": {"status": "failed", "small/hard": 1.5, "small/soft": 0.25, "paper/hard": 3.5, "paper/soft": 0.0},
            "shared": {"status": "ok", "alphas_equal_to_1_rank": True, "gloo_fallback_warned": True},
            "pytest_gpu": {"status": "ok", "summary": "15 passed, 3 skipped", "counts": {"passed": 15}},
            "peers_cnn": {"status": "ok", "batch": 10, "sequential": {"clients_per_s": 20.0},
                          "batched": {"clients_per_s": 70.0}},
            "kernels": {"status": "ok", "batch": 10, "rows": {
                "soft_top2/sequential": row("soft_top2", "sequential", 6000, 40.0, 12.5, 1.0),
                "soft_top2/batch 10": row("soft_top2", "batch 10", 600, 8.0, 50.0, 4.0),
                "hard/sequential": row("hard", "sequential", 2000, 10.0, 30.0, 1.0),
                "hard/batch 10": row("hard", "batch 10", 400, 5.0, 60.0, 2.0)}},
            "paper": {"status": "ok", "batch": 10, "rows": {
                "soft_dense/sequential": row("soft_dense", "sequential", 0, 0, 2.0, 1.0),
                "soft_dense/batch 10": row("soft_dense", "batch 10", 0, 0, 30.0, 15.0)},
                "memory": {"status": "ok", "peak_batch1_mib": 3000.0, "per_client_mib": 1024.0, "total_gib": 100.0,
                           "share": 0.8, "largest_batch": 77}},
            "default_batched": default(1.5, 1.0, 10),
            "default_captured": {"status": "unavailable", "why": "no runtime.capture"},
            "default_sequential": default(22.0, 8.0, 1),
            "step": {"status": "ok", "det/lanes1": {"ms_per_step": 500.0}, "det/lanes4": {"ms_per_step": 580.0},
                     "det/speedup": 0.862, "free/speedup": 1.03},
            "e2e": {"status": "ok", "lanes1": {"s_per_round": 6.0, "alphas_equal_to_1_lane": True},
                    "lanes4": {"s_per_round": 3.3, "alphas_equal_to_1_lane": True}},
        },
    }


def table_rows(text: str) -> dict[str, list[str]]:
    """The rendered table's rows by figure label: [section, value, target, verdict]."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("section", "---"):
            out[cells[1]] = [cells[0], *cells[2:]]
    return out


def write(tmp_path: Path, results: Any, name: str = "gpu_check.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return path


DOC = "# GPU\n\nText before, kept as it is.\n\n" + BEGIN + "\nno GPU run yet\n" + END + "\n\n## After\nkept too\n"


# -- the table ------------------------------------------------------------------------------------


def test_each_figure_shows_its_value_its_target_and_whether_it_is_met() -> None:
    rows = table_rows(render(gpu_results()))

    assert rows["SIGKILL after a checkpoint, resumed"] == ["resume", "bit-identical", "bit-identical", "met"]
    assert rows["1 vs 4 lanes torch.equal, hard / soft"][1:] == ["5/5, 5/5", "all equal", "met"]
    assert rows["host-device syncs per local step"][2:] == ["≤ 2", "not met"]  # paper/hard 3.5 > 2
    assert rows["paper-size supernet client-steps/s (dense soft): sequential → batched"][1:] == [
        "2.00 → 30.00 (15.00x) at batch 10", "≥ 10x sequential", "met"]
    assert rows["CUDA kernels per client-step, soft top-2: sequential → batched"][1:] == [
        "6000 → 600 (1/10.0) at batch 10", "≤ 1/8 of sequential at batch 10", "met"]
    assert rows["CUDA kernels per client-step, hard: sequential → batched"][3] == "not met"  # 1/5
    assert rows["GPU busy per client-step (share of its time), soft top-2: sequential → batched"][1] == \
        "40.0 ms (50%) → 8.0 ms (40%)"
    assert rows["FedAvg CNN clients/s (peers workload): sequential → batched"][1:] == [
        "20.0 → 70.0 (3.50x) at batch 10", "-", "-"]
    assert rows["default search s/round, 1 rank, batched"][1:] == [
        "1.25 s (soft top-2 1.50, hard 1.00; batch 10), 12.00x sequential", "≤ 2 s", "met"]
    assert rows["default search s/round, 1 rank, captured"][1:] == ["unavailable", "≤ 2 s", "open"]
    assert rows["largest batch one device holds (auto's rule)"][1] == "77 clients in 80% of 100 GiB"
    assert rows["gpu_check.py total, sections reached"][1:] == ["400 s, 14 of 14", "≤ 480 s, all", "met"]


def test_a_timed_out_section_shows_timeout_never_its_partial_numbers() -> None:
    results = gpu_results()
    results["sections"]["paper"]["status"] = "timeout"  # it had recorded figures before its budget ran out

    text = render(results)
    rows = table_rows(text)

    for label in ("paper-size supernet client-steps/s (dense soft): sequential → batched",
                  "memory per batched client", "largest batch one device holds (auto's rule)"):
        assert rows[label][1:2] == ["timeout"]
        assert rows[label][3].startswith("open")
    assert "30.00" not in text and "77 clients" not in text


def test_a_section_never_reached_says_so() -> None:
    results = gpu_results()
    del results["sections"]["e2e"]

    rows = table_rows(render(results))

    assert rows["4 lanes: alphas equal to 1 lane"][1:] == ["not reached", "yes", "open"]
    assert rows["gpu_check.py total, sections reached"][1:] == ["400 s, 13 of 14", "≤ 480 s, all", "not met"]


def test_no_nan_is_ever_printed_as_a_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = gpu_results()
    results["sections"]["paper"]["rows"]["soft_dense/batch 10"]["client_steps_per_s"] = math.nan
    results["sections"]["kernels"]["rows"]["hard/batch 10"]["gpu_busy_share"] = math.inf
    results["sections"]["default_batched"]["s_per_round"] = math.nan
    results["sections"]["paper"]["memory"]["per_client_mib"] = math.nan
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(results))  # json writes NaN and Infinity: what a careless writer leaves

    assert main([str(path)]) == 0
    rows = table_rows(capsys.readouterr().out)

    for section, value, _, _ in rows.values():
        assert "nan" not in value.lower() and "inf" not in value.lower(), (section, value)
    assert rows["memory per batched client"][1:] == ["n/a", "-", "-"]
    assert rows["default search s/round, 1 rank, batched"][1:] == ["n/a", "≤ 2 s", "open"]


def test_speed_targets_are_not_judged_on_a_dry_run() -> None:
    results = gpu_results()
    results.update(device_type="cpu", device="CPU: test", quick=True)

    text = render(results)
    rows = table_rows(text)

    assert text.startswith("**CPU dry run: not GPU figures.**")
    assert rows["default search s/round, 1 rank, batched"][3] == "open (dry run)"
    assert rows["gpu_check.py total, sections reached"][3] == "open (dry run)"
    assert rows["SIGKILL after a checkpoint, resumed"][3] == "met"  # resume is the same property on any device
    assert rows["host-device syncs per local step"][3] == "open (dry run)"  # a CPU has no syncs to count
    assert rows["pytest -m gpu"][3] == "open (dry run)"  # every GPU test skips on a CPU


# -- the doc ------------------------------------------------------------------------------------


def test_writing_the_doc_replaces_only_the_block_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "gpu.md"
    doc.write_text(DOC)

    assert main([str(write(tmp_path, gpu_results())), "--write-doc", str(doc)]) == 0
    once = doc.read_text()
    assert main([str(write(tmp_path, gpu_results())), "--write-doc", str(doc)]) == 0

    before, rest = once.split(BEGIN)
    block, after = rest.split(END)
    assert before == DOC.split(BEGIN)[0] and after == DOC.split(END)[1]
    assert "no GPU run yet" not in block and "| resume | SIGKILL after a checkpoint, resumed |" in block
    assert doc.read_text() == once  # writing again changes nothing


def expect_one_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_a_doc_without_its_markers_is_refused_and_left_as_it_was(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "gpu.md"
    for text in ("# GPU\nno markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n"):
        doc.write_text(text)
        expect_one_error(capsys, [str(write(tmp_path, gpu_results())), "--write-doc", str(doc)], BEGIN, END)
        assert doc.read_text() == text


def test_a_cpu_run_is_refused_for_the_doc_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = gpu_results()
    results.update(device_type="cpu", device="CPU: test")
    doc = tmp_path / "gpu.md"
    doc.write_text(DOC)
    path = write(tmp_path, results)

    expect_one_error(capsys, [str(path), "--write-doc", str(doc)], "--allow-cpu")
    assert doc.read_text() == DOC

    assert main([str(path), "--write-doc", str(doc), "--allow-cpu"]) == 0
    assert "**CPU dry run: not GPU figures.**" in doc.read_text().split(BEGIN)[1]


@pytest.mark.parametrize("text", ['{"device_type": "cuda", "sections": {"resume": ', "[1, 2]",
                                  '{"device_type": "cuda"}', '{"sections": {"resume": 3}}'])
def test_a_malformed_json_gives_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    path = tmp_path / "gpu_check.json"
    path.write_text(text)

    expect_one_error(capsys, [str(path)], str(path))


def test_a_missing_json_gives_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_one_error(capsys, [str(tmp_path / "absent.json")], "gpu_check.sh")


# -- the sections' order and budgets ------------------------------------------------------------


def test_the_section_budgets_fit_the_limit_with_the_start_up_margin() -> None:
    assert sum(s.budget_s for s in SECTIONS) <= SCRIPT_LIMIT_S - STARTUP_MARGIN_S
    assert all(s.budget_s > 0 for s in SECTIONS)
    assert STARTUP_MARGIN_S >= 20  # the shell, the report and the children's start beyond their budgets


def test_the_checks_come_first_resume_before_any_measurement() -> None:
    names = [s.name for s in SECTIONS]
    kinds = [s.kind for s in SECTIONS]

    assert names[0] == "device" and len(set(names)) == len(names)
    assert set(kinds) == {"check", "measure"}
    assert kinds == sorted(kinds)  # every "check" before every "measure"
    assert names.index("resume") < kinds.index("measure")
    assert {"pytest_gpu", "peers_cnn", "kernels", "paper", "default_sequential", "default_batched",
            "default_captured"} <= set(names)


def test_every_section_names_a_function_that_exists() -> None:
    for section in SECTIONS:
        module, function = section.runner.split(":")
        tree = ast.parse((BENCHMARKS / f"{module}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert function in defined, section


# -- the budget is enforced ---------------------------------------------------------------------

STAND_INS = '''
import time


def sleeps(ctx):
    ctx.record["before"] = 1.0
    time.sleep(60)  # ignores its deadline: the parent must kill it


def checks(ctx):
    ctx.record["steps"] = 0
    while True:  # respects its deadline: stops itself
        ctx.deadline.check("the next step")
        ctx.record["steps"] += 1
        time.sleep(0.05)


def quick(ctx):
    return {"figure": 2.5}
'''


def test_a_section_past_its_budget_is_a_timeout_and_the_next_one_runs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stand_ins.py").write_text(STAND_INS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{BENCHMARKS.parent}")
    (tmp_path / "sections").mkdir()
    args = argparse.Namespace(budget_scale=1.0, device="cpu", repeats=1, quick=True)

    start = time.time()
    killed = run_section(Section("a", 3.0, "stand_ins:sleeps", "check", ""), args, tmp_path)
    stopped = run_section(Section("b", 3.0, "stand_ins:checks", "check", ""), args, tmp_path)
    after = run_section(Section("c", 10.0, "stand_ins:quick", "check", ""), args, tmp_path)

    assert killed["status"] == "timeout" and killed["before"] == 1.0  # what it recorded survives the kill
    assert stopped["status"] == "timeout" and stopped["steps"] > 0 and "budget spent" in stopped["why"]
    assert after["status"] == "ok" and after["figure"] == 2.5
    assert killed["seconds"] <= 3.0 + 1.0 and stopped["seconds"] <= 3.0 + 1.0
    assert time.time() - start < 30

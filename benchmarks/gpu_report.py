"""One markdown table from benchmarks/gpu_check.py's JSON: section, figure, value, target, verdict.

    .venv/bin/python benchmarks/gpu_report.py runs/gpu_check/gpu_check.json                       # print it
    .venv/bin/python benchmarks/gpu_report.py runs/gpu_check/gpu_check.json --write-doc docs/gpu.md

`--write-doc` replaces only what lies between the `<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->`
lines of the doc, and refuses a JSON measured on a CPU unless `--allow-cpu` is given (the block is then
labelled a dry run), so a dry run never poses as GPU figures. A section that timed out shows `timeout`,
one never reached `not reached`; a missing or non-finite figure shows `n/a`: never a number it is not.
Verdicts: met / not met / open (no figure; or a target this run cannot judge: a GPU-only check on a CPU, a
speed target at tiny sizes); `-` where there is no target.
Errors (no such file, malformed JSON, missing markers, a CPU JSON for the doc): one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
Sections = dict[str, dict[str, Any]]


class ReportError(Exception):
    """A user-fixable problem with the JSON or the doc: one line, exit 2."""


def num(x: Any, spec: str = ".2f") -> str | None:
    """`x` formatted, or None where it is not a finite number (so it shows as n/a, never as nan)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return format(x, spec)


def ratio(a: Any, b: Any, spec: str = ".2f") -> str | None:
    """b / a ("x" after it), or None when either is missing, non-finite or a is 0."""
    if num(a) is None or num(b) is None or a == 0:
        return None
    return num(b / a, spec)


def yes(x: Any) -> str | None:
    return None if not isinstance(x, bool) else ("yes" if x else "no")


@dataclass(frozen=True)
class Figure:
    """One row: how to read its value from the section (None: not there), its target, and how to judge it
    (None: no target). `judged_on`: "any" device; "gpu" only (a CPU passes a GPU-only check trivially: no
    syncs to count, lanes without streams, GPU tests skipped); "full_gpu" (a speed target: not at --quick)."""

    section: str
    label: str
    value: Callable[[dict[str, Any], Sections], str | None]
    target: str = "-"
    met: Callable[[dict[str, Any], Sections], bool] | None = None
    judged_on: str = "any"


def _arrow(seq: Any, bat: Any, spec: str, better: str, k: Any = None) -> str | None:
    """"seq → bat (r)" where r is bat/seq ("x") or seq/bat ("1/r"), then the batch size k if given."""
    a, b = num(seq, spec), num(bat, spec)
    if a is None or b is None:
        return None
    r = ratio(seq, bat) if better == "x" else ratio(bat, seq, ".1f")
    return f"{a} → {b}" + ("" if r is None else (f" ({r}x)" if better == "x" else f" (1/{r})")) + (
        "" if k is None else f" at batch {k}")


def _kernel_rows(mode: str, name: str) -> list[Figure]:
    def row(s: dict[str, Any], key: str) -> Any:
        return s["rows"][f"{mode}/{key}"]

    def batch(s: dict[str, Any]) -> str:
        return f"batch {s['batch']}"

    def busy(s: dict[str, Any], key: str) -> str | None:
        r = row(s, key)
        ms, share = num(r["gpu_busy_ms"], ".1f"), num(r["gpu_busy_share"])
        return None if ms is None or share is None else f"{ms} ms ({100 * r['gpu_busy_share']:.0f}%)"

    def busy_pair(s: dict[str, Any], _: Sections) -> str | None:
        a, b = busy(s, "sequential"), busy(s, batch(s))
        return None if a is None or b is None else f"{a} → {b}"

    return [
        Figure("kernels", f"CUDA kernels per client-step, {name}: sequential → batched",
               lambda s, _: _arrow(row(s, "sequential")["kernels"], row(s, batch(s))["kernels"], ".0f", "1/",
                                   s["batch"]),
               "≤ 1/8 of sequential at batch 10",
               lambda s, _: row(s, batch(s))["kernels"] <= row(s, "sequential")["kernels"] / 8, judged_on="full_gpu"),
        Figure("kernels", f"GPU busy per client-step (share of its time), {name}: sequential → batched",
               busy_pair),
        Figure("kernels", f"client-steps/s, {name}: sequential → batched",
               lambda s, _: _arrow(row(s, "sequential")["client_steps_per_s"],
                                   row(s, batch(s))["client_steps_per_s"], ".1f", "x", s["batch"])),
    ]


def _default(variant: str, target: bool) -> Figure:
    def value(s: dict[str, Any], all_: Sections) -> str | None:
        mean = num(s.get("s_per_round"), ".2f")
        if mean is None:
            return None
        text = f"{mean} s (soft top-2 {num(s.get('s_per_round_soft_top2'), '.2f') or 'n/a'}, " \
               f"hard {num(s.get('s_per_round_hard'), '.2f') or 'n/a'}; batch {_batches(s)})"
        seq = all_.get("default_sequential", {})
        speed = ratio(s["s_per_round"], seq.get("s_per_round")) if variant != "sequential" else None
        return text + ("" if speed is None else f", {speed}x sequential")

    return Figure(f"default_{variant}", f"default search s/round, 1 rank, {variant}", value,
                  "≤ 2 s" if target else "-", (lambda s, _: s["s_per_round"] <= 2.0) if target else None,
                  judged_on="full_gpu")


def _batches(s: dict[str, Any]) -> str:
    ks = sorted({int(k) for k in s.get("client_batch_by_round") or [] if num(k) is not None})
    return "/".join(str(k) for k in ks) or "n/a"


def _syncs(s: dict[str, Any], _: Sections) -> str | None:
    keys = ("small/hard", "small/soft", "paper/hard", "paper/soft")
    vals = [num(s.get(k), ".2f") for k in keys]
    return None if None in vals else ", ".join(f"{k} {v}" for k, v in zip(keys, vals))


def _step(s: dict[str, Any]) -> str | None:
    one, four = num(s["det/lanes1"]["ms_per_step"], ".0f"), num(s["det/lanes4"]["ms_per_step"], ".0f")
    speedup, free = num(s["det/speedup"]), num(s["free/speedup"])
    return None if None in (one, four, speedup, free) else f"{one} → {four} ({speedup}x; free-running {free}x)"


def _paper_row(s: dict[str, Any], variant: str) -> dict[str, Any]:
    return s["rows"][f"soft_dense/{variant}"]


def _memory(key: str, spec: str, unit: str) -> Callable[[dict[str, Any], Sections], str | None]:
    def value(s: dict[str, Any], _: Sections) -> str | None:
        v = num((s.get("memory") or {}).get(key), spec)
        return None if v is None else f"{v}{unit}"
    return value


def _largest(s: dict[str, Any], _: Sections) -> str | None:
    m = s.get("memory") or {}
    k, total, share = num(m.get("largest_batch"), ".0f"), num(m.get("total_gib"), ".0f"), num(m.get("share"))
    return None if None in (k, total, share) else f"{k} clients in {100 * m['share']:.0f}% of {total} GiB"


FIGURES: tuple[Figure, ...] = (
    Figure("device", "device", lambda s, _: s.get("device") and (
        f"{s['device']}, {num(s.get('total_memory_gib'), '.0f')} GiB" if num(s.get("total_memory_gib")) else
        f"{s['device']}, {s.get('cores', '?')} cores")),
    Figure("resume", "SIGKILL after a checkpoint, resumed", lambda s, _: yes(s.get("bit_identical")) and (
        "bit-identical" if s["bit_identical"] else "differs"), "bit-identical", lambda s, _: s["bit_identical"]),
    Figure("lanes", "1 vs 4 lanes torch.equal, hard / soft", lambda s, _: (
        f"{s['hard']['equal']}/{s['hard']['repeats']}, {s['soft']['equal']}/{s['soft']['repeats']}"),
        "all equal", lambda s, _: all(s[m]["equal"] == s[m]["repeats"] for m in ("hard", "soft")), "gpu"),
    Figure("syncs", "host-device syncs per local step", _syncs, "≤ 2",
           lambda s, _: all(v <= 2 for k, v in s.items() if "/" in k), "gpu"),
    Figure("shared", "2 ranks on 1 GPU vs 1 rank: alphas equal", lambda s, _: yes(s.get("alphas_equal_to_1_rank")),
           "yes", lambda s, _: s["alphas_equal_to_1_rank"], "gpu"),
    Figure("pytest_gpu", "pytest -m gpu", lambda s, _: s.get("summary") or None, "0 failed",
           lambda s, _: s["status"] == "ok", "gpu"),
    Figure("peers_cnn", "FedAvg CNN clients/s (peers workload): sequential → batched", lambda s, _: _arrow(
        (s.get("sequential") or {}).get("clients_per_s"), (s.get("batched") or {}).get("clients_per_s"), ".1f", "x",
        s.get("batch"))),
    *_kernel_rows("soft_top2", "soft top-2"),
    *_kernel_rows("hard", "hard"),
    Figure("paper", "paper-size supernet client-steps/s (dense soft): sequential → batched", lambda s, _: _arrow(
        _paper_row(s, "sequential")["client_steps_per_s"], _paper_row(s, f"batch {s['batch']}")["client_steps_per_s"],
        ".2f", "x", s["batch"]), "≥ 10x sequential",
        lambda s, _: _paper_row(s, f"batch {s['batch']}")["speed_vs_sequential"] >= 10, "full_gpu"),
    Figure("paper", "peak memory of a batch of 1 client", _memory("peak_batch1_mib", ".0f", " MiB")),
    Figure("paper", "memory per batched client", _memory("per_client_mib", ".0f", " MiB")),
    Figure("paper", "largest batch one device holds (auto's rule)", _largest),
    _default("batched", True),
    _default("captured", True),
    _default("sequential", False),
    Figure("step", "paper-size step ms, 1 → 4 lanes (deterministic)", lambda s, _: _step(s)),
    Figure("e2e", "2-round run s/round, 1 / 4 lanes", lambda s, _: (
        f"{num(s['lanes1']['s_per_round'], '.2f')} / {num(s['lanes4']['s_per_round'], '.2f')}"
        if num(s["lanes1"]["s_per_round"]) and num(s["lanes4"]["s_per_round"]) else None)),
    Figure("e2e", "4 lanes: alphas equal to 1 lane", lambda s, _: yes(s["lanes4"]["alphas_equal_to_1_lane"]),
           "yes", lambda s, _: s["lanes4"]["alphas_equal_to_1_lane"], "gpu"),
)


def load(path: Path) -> dict[str, Any]:
    """gpu_check.json, checked for the keys the table needs."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} not found; run benchmarks/gpu_check.sh first") from None
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON ({err}); rerun benchmarks/gpu_check.py") from None
    if not isinstance(data, dict) or not isinstance(data.get("sections"), dict) or \
            not all(isinstance(v, dict) for v in data["sections"].values()):
        raise ReportError(f"{path} is not gpu_check.py's JSON (no 'sections' object of sections); "
                          "rerun benchmarks/gpu_check.py")
    return data


def judged(fig: Figure, results: dict[str, Any]) -> bool:
    """Whether this run can judge the figure's target (see Figure.judged_on)."""
    gpu = results.get("device_type") == "cuda"
    return {"any": True, "gpu": gpu, "full_gpu": gpu and not results.get("quick")}[fig.judged_on]


def cell(fig: Figure, results: dict[str, Any]) -> tuple[str, str]:
    """(value, verdict) of one figure, from its section's status first and its figure second."""
    sec = results["sections"].get(fig.section)
    if sec is None:
        return "not reached", "open"
    status = sec.get("status")
    if status in ("timeout", "unavailable"):
        return status, "open"
    if status == "error":  # a check that crashed did not hold; a measurement that crashed is not measured
        return "error", "not met" if fig.met is not None and fig.judged_on != "full_gpu" else "open"
    try:
        value = fig.value(sec, results["sections"])
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, ZeroDivisionError):
        value = None
    if not value:
        return "n/a", "open" if fig.met is not None else "-"
    if fig.met is None:
        return value, "-"
    if not judged(fig, results):
        return value, "open (dry run)"
    try:
        return value, "met" if fig.met(sec, results["sections"]) else "not met"
    except (KeyError, TypeError, IndexError, AttributeError):
        return value, "open"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The table's rows: the whole check first, then every figure in section order."""
    order = results.get("order") or list(results["sections"])
    reached = [n for n in order if n in results["sections"]]
    total, limit = num(results.get("total_s"), ".0f"), num(results.get("limit_s"), ".0f")
    full_gpu = results.get("device_type") == "cuda" and not results.get("quick")
    whole_met = "open (dry run)" if not full_gpu or total is None else (
        "met" if results["total_s"] <= results["limit_s"] and len(reached) == len(order) else "not met")
    out = [("check", "gpu_check.py total, sections reached", f"{total or 'n/a'} s, {len(reached)} of {len(order)}",
            f"≤ {limit or 'n/a'} s, all", whole_met)]
    for fig in FIGURES:
        value, verdict = cell(fig, results)
        out.append((fig.section, fig.label, value, fig.target, verdict))
    return out


def render(results: dict[str, Any]) -> str:
    """The markdown block: what ran it and when, the table, each section's seconds against its budget."""
    cpu = results.get("device_type") != "cuda"
    who = f"{results.get('device') or 'unknown device'} (torch {results.get('torch') or '?'}" + (
        f", CUDA {results['cuda']})" if results.get("cuda") and not cpu else ")")
    command = " ".join(["gpu_check.py", *(results.get("argv") or [])])
    head = ("**CPU dry run: not GPU figures.** " if cpu else "") + \
        f"Measured on {who}, {results.get('date') or 'date unknown'}: `{command}`" + \
        (" (quick: tiny sizes)." if results.get("quick") else ".")
    lines = [head, "", "| section | figure | value | target | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(_escape(c) for c in row)} |" for row in rows(results)]
    timing = [f"{name} {_status_time(sec)}" for name, sec in results["sections"].items()]
    lines += ["", "Seconds / budget per section: " + "; ".join(timing) + "."]
    errors = [f"- {name} ({sec.get('status')}): "
              + _escape(str(sec.get("error") or sec.get("why") or "a check did not hold (see its row)"))[:200]
              for name, sec in results["sections"].items() if sec.get("status") not in ("ok", None)]
    return "\n".join(lines + (["", "Sections without all their figures:"] + errors if errors else []))


def _status_time(sec: dict[str, Any]) -> str:
    s, b = num(sec.get("seconds"), ".0f"), num(sec.get("budget_s"), ".0f")
    return f"{sec.get('status', '?')} {s or 'n/a'}/{b or 'n/a'} s"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def replace_block(doc: str, block: str, name: str) -> str:
    """`doc` with what lies between its BEGIN and END marker lines replaced by `block`, the rest as it was."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ReportError(f"{name} needs exactly one '{BEGIN}' line followed by one '{END}' line "
                          "around the table; add them where the table goes")
    start = doc.index(BEGIN) + len(BEGIN)
    return doc[:start] + "\n" + block.rstrip("\n") + "\n" + doc[doc.index(END):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="gpu_check.json (gpu_check.py --out DIR writes DIR/gpu_check.json)")
    p.add_argument("--write-doc", type=Path, help="put the table between the doc's gpu_check markers")
    p.add_argument("--allow-cpu", action="store_true", help="write a CPU dry run into the doc (labelled as such)")
    args = p.parse_args(argv)
    try:
        results = load(args.json)
        block = render(results)
        if args.write_doc is not None:
            if results.get("device_type") != "cuda" and not args.allow_cpu:
                raise ReportError(f"{args.json} was measured on {results.get('device_type')!s}, not a GPU: its "
                                  f"figures are no GPU figures; pass --allow-cpu to write it into {args.write_doc} "
                                  "as a dry run")
            try:
                doc = args.write_doc.read_text()
            except OSError as err:
                raise ReportError(f"cannot read {args.write_doc}: {err.strerror}") from None
            args.write_doc.write_text(replace_block(doc, block, str(args.write_doc)))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(block)
    if args.write_doc is not None:
        print(f"\nwrote the table into {args.write_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

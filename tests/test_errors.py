"""Every row of docs/errors.md: a bad input ends in one `error:` line naming the field or file and the fix,
exit code 2, and leaves what is already on disk untouched. The cases are run in-process through
`fedmetanas.cli.main` (the multi-rank one under mpirun lives in test_bad_input.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from fedmetanas import cli
from tests.helpers import REPO, tiny_overrides

# id -> (prepare(tmp, data_root) -> argv, substring the error line must contain)
Prepare = Callable[[Path, Path], list[str]]


def _base(tmp: Path, root: Path, *extra: str) -> list[str]:
    return tiny_overrides(root, tmp / "runs") + list(extra)


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return path


def _truncated_root(tmp: Path, root: Path) -> Path:
    bad = tmp / "truncated"
    shutil.copytree(root / "FashionMNIST", bad / "FashionMNIST")
    images = bad / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    return bad


def _a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("a file where a directory is expected")
    return path


def _finished_run(tmp: Path, root: Path) -> list[str]:
    args = _base(tmp, root, "federated.rounds=1")
    assert cli.main(args) == 0
    return args


def _corrupt_checkpoints(tmp: Path, root: Path) -> list[str]:
    args = _finished_run(tmp, root)
    for ckpt in (tmp / "runs" / "tiny" / "checkpoints").iterdir():
        ckpt.write_bytes(b"not a checkpoint")
    return args + ["--resume"]


CASES: dict[str, tuple[Prepare, str]] = {
    "malformed-yaml": (lambda t, r: ["--config", str(_yaml(t, "data:\n  name: mnist\n rounds: [\n"))], "malformed YAML at line"),
    "missing-config-file": (lambda t, r: ["--config", str(t / "nope.yaml")], "--config"),
    "config-not-a-mapping": (lambda t, r: ["--config", str(_yaml(t, "- a\n- b\n"))], "top level must be a mapping"),
    "unknown-section": (lambda t, r: _base(t, r, "federation.rounds=3"), "did you mean 'federated'"),
    "misspelled-key": (lambda t, r: _base(t, r, "federated.num_client=4"), "did you mean 'federated.num_clients'"),
    "string-for-integer": (lambda t, r: _base(t, r, "federated.rounds=two"), "federated.rounds: expected an integer"),
    "integer-for-boolean": (lambda t, r: _base(t, r, "data.download=1"), "data.download: expected true or false"),
    "text-for-number": (lambda t, r: _base(t, r, "search.tau_max=hot"), "search.tau_max: expected a number"),
    "dirichlet-alpha-zero": (lambda t, r: _base(t, r, "data.dirichlet_alpha=0"), "data.dirichlet_alpha"),
    "dirichlet-alpha-negative": (lambda t, r: _base(t, r, "data.dirichlet_alpha=-0.5"), "data.dirichlet_alpha"),
    "unknown-dataset": (lambda t, r: _base(t, r, "data.name=fashionmnist"), "did you mean 'fashion_mnist'"),
    "unknown-partition": (lambda t, r: _base(t, r, "data.partition=dirichlett"), "data.partition"),
    "unknown-primitive": (lambda t, r: _base(t, r, "model.primitives=[sep_conv_3x3, sep_conv_9x9]"), "sep_conv_9x9"),
    "only-none-primitive": (lambda t, r: _base(t, r, "model.primitives=[none]"), "model.primitives"),
    "unknown-schedule": (lambda t, r: _base(t, r, "search.tau_schedule=linaer"), "did you mean 'linear'"),
    "tau-min-above-max": (lambda t, r: _base(t, r, "search.tau_min=2.0"), "search.tau_min"),
    "participation-out-of-range": (lambda t, r: _base(t, r, "federated.participation=1.5"), "federated.participation"),
    "more-per-round-than-clients": (lambda t, r: _base(t, r, "federated.clients_per_round=9"), "federated.clients_per_round"),
    "reduction-layer-out-of-range": (lambda t, r: _base(t, r, "model.reduction_layers=[5]"), "model.reduction_layers"),
    "inner-betas-out-of-range": (lambda t, r: _base(t, r, "algorithm.inner_betas=[1.5, 0.9]"), "algorithm.inner_betas"),
    "misspelled-algorithm": (lambda t, r: _base(t, r, "algorithm.name=fednsa"), "did you mean 'fednas'"),
    "unknown-fedavg-architecture": (lambda t, r: _base(t, r, "fedavg.architecture=resnet"), "fedavg.architecture"),
    "override-without-equals": (lambda t, r: _base(t, r, "federated.rounds"), "section.key=value"),
    "override-bad-yaml": (lambda t, r: _base(t, r, "model.primitives=[a"), "not valid YAML"),
    "missing-data-no-download": (lambda t, r: _base(t, t / "empty"), "data.root"),
    "truncated-data-file": (lambda t, r: _base(t, _truncated_root(t, r)), "t10k-images-idx3-ubyte"),
    "impossible-min-samples": (lambda t, r: _base(t, r, "data.min_samples=20000"), "min_samples"),
    "existing-run": (lambda t, r: _finished_run(t, r), "--overwrite"),
    "unwritable-output": (lambda t, r: tiny_overrides(r, _a_file(t) / "runs"), "output.dir"),
    "cuda-without-gpu": (lambda t, r: _base(t, r, "runtime.device=cuda"), "runtime.device"),
    "corrupt-checkpoints": (_corrupt_checkpoints, "no readable checkpoint"),
    "mismatched-checkpoint": (lambda t, r: _finished_run(t, r) + ["--resume", "model.channels=6"], "model.channels"),
}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_input_gives_one_clear_line_and_exit_2(case: str, data_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    if case == "cuda-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    prepare, expected = CASES[case]
    argv = prepare(tmp_path, data_root)
    before = _snapshot(tmp_path)
    capsys.readouterr()

    code = cli.main(argv)

    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already written changed


def test_docs_errors_table_lists_exactly_the_tested_cases() -> None:
    rows = re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", (REPO / "docs" / "errors.md").read_text(), flags=re.M)
    assert sorted(rows) == sorted(CASES)
    assert len(rows) >= 25

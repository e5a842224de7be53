"""Every row of docs/errors.md is a test. The rows of CASES: a bad input ends in one `error:` line naming
the field or file and the fix, exit code 2, and leaves what is already on disk untouched; they run
in-process through `fedmetanas.cli.main` (the multi-rank one under mpirun lives in test_bad_input.py).
The rows of ELSEWHERE (signals, hangs, runs that must finish) are tests in the files they name."""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fedmetanas import cli
from fedmetanas.config import OutputConfig
from fedmetanas.rundir import MARKER, RunLock, acquire_run_dir
from fedmetanas.search.genotypes import DARTS_V2
from tests.helpers import REPO, tiny_overrides

# Cases the round loop (fedmetanas/federated/simulation.py) has yet to handle; they pass once it does.

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


def _corrupt_legacy_root(tmp: Path) -> Path:
    """torchvision's old layout, processed/{training,test}.pt and no raw/, both files damaged."""
    processed = tmp / "legacy" / "FashionMNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(b"0000")  # pickle POPs on an empty stack (the IndexError)
    return tmp / "legacy"


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


def _another_run(tmp: Path) -> None:
    """A finished run next to the one a case starts: it must survive whatever the case does."""
    other = tmp / "runs" / "other"
    other.mkdir(parents=True)
    (other / MARKER).write_text("a fedmetanas run directory\n")
    (other / "trajectory.h5").write_bytes(b"another run's log")


def _with_another_run(tmp: Path, root: Path, *extra: str) -> list[str]:
    _another_run(tmp)
    return _base(tmp, root, *extra)


def _precious(tmp: Path) -> Path:
    """A user's folder that is not a run: --overwrite must never delete it."""
    folder = tmp / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _users_folder_in_runs(tmp: Path, root: Path) -> list[str]:
    notes = tmp / "runs" / "notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("not a run")
    return _base(tmp, root, "--name", "notes", "--overwrite")


def _users_run_files_in_runs(tmp: Path, root: Path, *flags: str) -> list[str]:
    """Issue 21: a folder of the user's holding files named like a run's, started into without --overwrite."""
    notes = tmp / "runs" / "notes"
    notes.mkdir(parents=True)
    for name in ("config.yaml", "genotype.txt", "other.txt"):
        (notes / name).write_text(f"the user's {name}")
    return _base(tmp, root, "--name", "notes", *flags)


_LOCKS: list[RunLock] = []  # run directories held as a running run would hold them; released after each test


def _running_run(tmp: Path, root: Path) -> list[str]:
    _LOCKS.append(acquire_run_dir(OutputConfig(dir=str(tmp / "runs"), name="tiny")))
    return _base(tmp, root, "--overwrite")


@pytest.fixture(autouse=True)
def _release_locks() -> Iterator[None]:
    yield
    while _LOCKS:
        _LOCKS.pop().release()


def _finished_two_rounds(tmp: Path, root: Path) -> list[str]:
    args = _base(tmp, root, "federated.rounds=2")
    assert cli.main(args) == 0
    return args


def _bad_genotype(**changes: object) -> str:
    return "fedavg.architecture=" + DARTS_V2._replace(**changes).to_string()


def _non_utf8(tmp: Path) -> Path:
    path = tmp / "cfg.yaml"
    path.write_bytes("output:\n  name: caf\u00e9\n".encode("latin-1"))
    return path


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
    "fixed-net-channels-vs-norm-groups": (lambda t, r: _base(t, r, "algorithm.name=fedavg", "model.norm=group",
                                                              "model.norm_groups=4", "fedavg.channels=6"),
                                          "fedavg.channels: 6 channels"),
    "plain-steps-under-reptile": (lambda t, r: _base(t, r, "algorithm.meta_update=reptile",
                                                      "algorithm.plain_after_fraction=0.5"),
                                  "needs algorithm.meta_update: fomaml"),
    "plain-steps-for-per-fedavg": (lambda t, r: _base(t, r, "algorithm.name=perfedavg",
                                                       "algorithm.plain_after_fraction=0.5"),
                                   "algorithm.plain_after_fraction: 0.5 is FedMetaNAS's"),
    "kept-meta-state-under-sgd": (lambda t, r: _base(t, r, "algorithm.meta_state=kept",
                                                      "algorithm.meta_optimizer=sgd"),
                                  "algorithm.meta_state: kept is the FOMAML meta learner's Adam state"),
    "kept-meta-state-with-sgd-logits": (lambda t, r: _base(t, r, "algorithm.meta_state=kept",
                                                            "algorithm.meta_optimizer_alpha=sgd"),
                                        "meta_optimizer_alpha: sgd); set meta_state: fresh"),
    "kept-meta-state-for-per-fedavg": (lambda t, r: _base(t, r, "algorithm.name=perfedavg",
                                                           "algorithm.meta_state=kept"),
                                       "Per-FedAvg's clients keep none"),
    "kept-meta-state-in-client-batches": (lambda t, r: _base(t, r, "algorithm.meta_state=kept",
                                                              "runtime.client_batch=2"),
                                          "runtime.client_batch: 2 but algorithm.meta_state: kept has no batched"),
    "override-without-equals": (lambda t, r: _base(t, r, "federated.rounds"), "section.key=value"),
    "override-bad-yaml": (lambda t, r: _base(t, r, "model.primitives=[a"), "not valid YAML"),
    "missing-data-no-download": (lambda t, r: _base(t, t / "empty"), "data.root"),
    "truncated-data-file": (lambda t, r: _base(t, _truncated_root(t, r)), "t10k-images-idx3-ubyte"),
    "impossible-min-samples": (lambda t, r: _base(t, r, "data.min_samples=20000"),
                               "the largest data.min_samples that works for this data, federated.num_clients and "
                               "federated.seed is 14662"),
    "min-samples-for-many-clients": (lambda t, r: _base(t, r, "federated.num_clients=1000"),
                                     "the largest data.min_samples that works for this data, federated.num_clients "
                                     "and federated.seed is 18: set data.min_samples <= 18"),
    "existing-run": (lambda t, r: _finished_run(t, r), "--overwrite"),
    "unwritable-output": (lambda t, r: tiny_overrides(r, _a_file(t) / "runs"), "output.dir"),
    "cuda-without-gpu": (lambda t, r: _base(t, r, "runtime.device=cuda"), "runtime.device"),
    "corrupt-checkpoints": (_corrupt_checkpoints, "no readable checkpoint"),
    "mismatched-checkpoint": (lambda t, r: _finished_run(t, r) + ["--resume", "model.channels=6"], "model.channels"),
    # -- issue 10: data safety
    "name-dot-overwrite": (lambda t, r: _with_another_run(t, r, "--name", ".", "--overwrite"), "output.name"),
    "name-dotdot-overwrite": (lambda t, r: _with_another_run(t, r, "--name", "..", "--overwrite"), "output.name"),
    "name-absolute-overwrite": (lambda t, r: _base(t, r, "--name", str(_precious(t)), "--overwrite"), "output.name"),
    "overwrite-not-a-run": (_users_folder_in_runs, "not a fedmetanas run directory"),
    "run-in-use": (_running_run, "in use by a running run"),
    "folder-not-a-run": (_users_run_files_in_runs, "not a fedmetanas run directory"),
    "resume-in-a-folder-not-a-run": (lambda t, r: _users_run_files_in_runs(t, r, "--resume"),
                                     "not a fedmetanas run directory"),
    # -- issue 10: hangs
    "collective-timeout-too-small": (lambda t, r: _base(t, r, "runtime.collective_timeout_s=1e-9"),
                                     "runtime.collective_timeout_s"),
    # A 1-channel, 1-cell net and a single step: until the loop checks, the run is seconds, not minutes.
    "batch-larger-than-every-client": (lambda t, r: _base(t, r, "algorithm.batch_size=100000", "model.channels=1",
                                                          "model.layers=1", "model.reduction_layers=null",
                                                          "algorithm.local_steps=1", "federated.rounds=1",
                                                          "personalize.steps=0"), "algorithm.batch_size"),
    # -- issue 10: bad input that used to be accepted
    "learning-rate-infinite": (lambda t, r: _base(t, r, "algorithm.inner_lr_w=.inf"), "algorithm.inner_lr_w"),
    "temperature-below-floor": (lambda t, r: _base(t, r, "search.tau_min=1e-300", "search.tau_max=1e-300"),
                                "search.tau_min"),
    "personalize-without-local-test": (lambda t, r: _base(t, r, "data.local_test_fraction=0"),
                                       "data.local_test_fraction"),
    "resume-fewer-rounds": (lambda t, r: _finished_two_rounds(t, r) + ["--resume", "federated.rounds=1"],
                            "federated.rounds"),
    "seed-negative": (lambda t, r: _base(t, r, "federated.seed=-1"), "federated.seed"),
    "seed-above-32-bits": (lambda t, r: _base(t, r, "federated.seed=4294967296"), "federated.seed"),
    "duplicate-yaml-key": (lambda t, r: _base(t, r, "--config", str(_yaml(t, "federated:\n  rounds: 3\n  rounds: 5\n"))),
                           "'rounds' appears twice"),
    "unknown-log-level": (lambda t, r: _base(t, r, "--log-level=LOUD"), "--log-level"),
    "empty-name": (lambda t, r: _base(t, r, "--name", ""), "output.name"),
    # -- issue 10: messages
    "genotype-unknown-op": (lambda t, r: _base(t, r, "algorithm.name=fedavg", _bad_genotype(
        normal=[[("sep_conv_3x3", 0), ("sep_conv_9x9", 1)]] + DARTS_V2.normal[1:])), "fedavg.architecture"),
    "genotype-input-out-of-range": (lambda t, r: _base(t, r, "algorithm.name=fedavg", _bad_genotype(
        normal=DARTS_V2.normal[:3] + [[("skip_connect", 0), ("dil_conv_3x3", 7)]])), "fedavg.architecture"),
    "non-utf8-config": (lambda t, r: _base(t, r, "--config", str(_non_utf8(t))), "not UTF-8"),
    "name-part-too-long": (lambda t, r: _base(t, r, "--name", "x" * 300), "output.name"),
    "name-path-too-long": (lambda t, r: _base(t, r, "--name", "/".join(["d" * 200] * 25)), "output.name"),
    "dirichlet-alpha-infinite": (lambda t, r: _base(t, r, "data.dirichlet_alpha=.inf"), "data.dirichlet_alpha"),
    # -- the server optimizer and the stop rules
    "misspelled-server-optimizer": (lambda t, r: _base(t, r, "federated.server_optimizer=fedadam"),
                                    "did you mean 'adam'"),
    "server-lr-zero": (lambda t, r: _base(t, r, "federated.server_lr=0"), "federated.server_lr"),
    "server-momentum-one": (lambda t, r: _base(t, r, "federated.server_momentum=1"), "federated.server_momentum"),
    "server-betas-out-of-range": (lambda t, r: _base(t, r, "federated.server_betas=[0.9, 1.0]"),
                                  "federated.server_betas"),
    "server-eps-zero": (lambda t, r: _base(t, r, "federated.server_eps=0"), "federated.server_eps"),
    "time-budget-negative": (lambda t, r: _base(t, r, "federated.time_budget_s=-1"), "federated.time_budget_s"),
    "time-budget-infinite": (lambda t, r: _base(t, r, "federated.time_budget_s=.inf"), "0: no budget"),
    "stable-rounds-negative": (lambda t, r: _base(t, r, "algorithm.name=fednas", "fednas.stable_rounds=-1"),
                               "fednas.stable_rounds"),
    "soft-topk-negative": (lambda t, r: _base(t, r, "search.soft_topk=-1"), "search.soft_topk"),
    "warmup-the-whole-search": (lambda t, r: _base(t, r, "search.warmup_fraction=1"), "search.warmup_fraction"),
    "prune-patience-zero": (lambda t, r: _base(t, r, "search.prune_patience=0"), "search.prune_patience"),
    "client-batch-zero": (lambda t, r: _base(t, r, "runtime.client_batch=0"), "runtime.client_batch"),
    "capture-graphs-on-a-cpu": (lambda t, r: _base(t, r, "runtime.capture=graphs", "runtime.device=cpu"),
                                "runtime.capture: graphs needs CUDA graphs"),
    # -- issue 21: hostile input, third pass
    "quoted-boolean": (lambda t, r: _base(t, r, 'data.download="false"'), "write false without quotes"),
    "multi-document-yaml": (lambda t, r: _base(t, r, "--config", str(_yaml(t, "federated:\n  rounds: 2\n---\nmodel:\n"
                                                                            "  channels: 4\n"))),
                            "more than one YAML document"),
    "python-tag-in-yaml": (lambda t, r: _base(t, r, "--config",
                                              str(_yaml(t, "federated: !!python/object:os.system {}\n"))),
                           "is not allowed"),
    "name-with-newline": (lambda t, r: _base(t, r, "--name", "demo\nrun"), "control character"),
    "empty-output-dir": (lambda t, r: _base(t, r, "output.dir="), "output.dir"),
    "corrupt-legacy-data-files": (lambda t, r: _base(t, _corrupt_legacy_root(t)), "processed/training.pt"),
    "config-is-a-folder": (lambda t, r: _base(t, r, "--config", str(t)), "is a folder, not a file"),
    "config-not-a-regular-file": (lambda t, r: _base(t, r, "--config", "/dev/null"), "not a regular file"),
    "override-below-a-value": (lambda t, r: _base(t, r, "federated.rounds.x=1"), "federated.rounds is a value"),
    "section-override-not-a-mapping": (lambda t, r: _base(t, r, "federated=null"), "federated is a section"),
}

# Rows of docs/errors.md tested elsewhere: case -> (docs section, "test file::test function").
ELSEWHERE: dict[str, tuple[str, str]] = {
    "run-started-twice": ("data safety", "tests/test_rundir.py::test_the_same_name_started_twice_runs_once"),
    "ctrl-c-to-rank-0": ("hangs", "tests/test_interrupt.py::"
                         "test_ctrl_c_to_rank_0_drops_the_round_and_the_resumed_run_equals_an_uninterrupted_one"),
    "ctrl-c-to-the-job": ("hangs", "tests/test_interrupt.py::test_ctrl_c_to_the_whole_job_exits_130_with_a_readable_log"),
    "two-ctrl-c-to-the-job": ("hangs", "tests/test_interrupt.py::test_two_ctrl_c_to_the_job_a_second_apart_stop_it_cleanly"),
    "second-ctrl-c": ("hangs", "tests/test_interrupt.py::test_a_second_ctrl_c_ends_the_run_at_once"),
    "report-on-truncated-log": ("hangs", "tests/reporting/test_report.py::test_a_truncated_log_is_one_error_line_never_a_hang"),
    "every-update-nonfinite": ("accepted bad input",
                               "tests/test_nonfinite.py::test_a_round_that_excluded_every_client_fails_with_exit_3"),
    "one-layer-network": ("accepted bad input",
                          "tests/test_end_to_end.py::test_a_one_layer_network_reports_only_its_normal_cell"),
    "genotype-override-with-commas": ("messages",
                                      "tests/test_config.py::test_a_genotype_override_with_commas_survives_the_command_line"),
    "resume-with-data-elsewhere": ("messages", "tests/test_resume.py::test_resume_finds_the_same_data_by_another_path"),
    "fetch-root-not-a-folder": (
        "messages", "tests/data/test_datasets.py::test_fetch_into_a_root_that_is_not_a_folder_is_one_error_line"),
    "personalization-diverged": (
        "accepted bad input",
        "tests/test_nonfinite.py::test_a_diverged_personalization_is_named_and_not_reported_as_a_result"),
    "rendezvous-address-not-this-host": (
        "hangs", "tests/test_bad_input.py::"
        "test_a_rendezvous_address_rank_0_cannot_bind_is_named_on_every_rank_without_a_hang"),
    "rendezvous-port-taken": (
        "hangs", "tests/test_dist.py::"
        "test_an_address_rank_0_cannot_bind_names_the_address_and_a_taken_port_names_the_port"),
    "killed-in-round-1": ("data safety",
                          "tests/test_resume.py::test_a_run_killed_in_round_1_is_started_afresh_by_resume"),
    "disk-full-at-a-checkpoint": (
        "data safety", "tests/test_resume.py::test_a_full_disk_at_the_first_checkpoint_is_one_line_and_resumable"),
    "resume-fields-documented": (
        "messages", "tests/test_checkpoint.py::test_the_reliability_docs_list_exactly_the_fields_a_resume_may_change"),
    "ctrl-c-while-loading": ("hangs",
                             "tests/test_interrupt.py::test_ctrl_c_while_the_program_loads_is_one_line_and_exit_130"),
    "master-addr-in-brackets": ("messages",
                                "tests/test_config.py::test_an_optional_text_field_keeps_its_override_as_typed"),
    "section-override-keeps-the-file": (
        "messages", "tests/test_config.py::test_a_section_override_sets_its_keys_and_keeps_the_files_others"),
}
# The docs section of each case of CASES (the 32 documented before issue 10 are "messages").
SECTIONS = {
    **dict.fromkeys(["name-dot-overwrite", "name-dotdot-overwrite", "name-absolute-overwrite", "overwrite-not-a-run",
                     "run-in-use", "folder-not-a-run", "resume-in-a-folder-not-a-run"], "data safety"),
    **dict.fromkeys(["collective-timeout-too-small", "batch-larger-than-every-client"], "hangs"),
    **dict.fromkeys(["learning-rate-infinite", "temperature-below-floor", "personalize-without-local-test",
                     "resume-fewer-rounds", "seed-negative", "seed-above-32-bits", "duplicate-yaml-key",
                     "unknown-log-level", "empty-name", "name-with-newline", "empty-output-dir"],
                    "accepted bad input"),
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


def _documented() -> dict[str, str]:
    """case -> the docs/errors.md section (lower-case heading) whose table lists it."""
    out, section = {}, ""
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip().lower()
        found = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|", line)
        if found:
            assert found.group(1) not in out, f"{found.group(1)} listed twice"
            out[found.group(1)] = section
    return out


def test_docs_errors_tables_list_exactly_the_tested_cases_in_their_sections() -> None:
    expected = {case: SECTIONS.get(case, "messages") for case in CASES}
    expected.update({case: section for case, (section, _) in ELSEWHERE.items()})

    assert _documented() == expected
    assert len(CASES) >= 32 + 20


@pytest.mark.parametrize("case", sorted(ELSEWHERE))
def test_each_case_documented_elsewhere_names_a_test_that_exists(case: str) -> None:
    path, name = ELSEWHERE[case][1].split("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, name, None)), ELSEWHERE[case][1]

"""benchmarks/seed_pool.py: the sign test against hand-computed binomial sums, the pooled figures, and the
pairing of run folders on fake logs (tiny HDF5 files with only a /final group). No runs: milliseconds."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import pytest

from benchmarks.seed_pool import main, pairs, pool, sign_test


def fake_run(folder: Path, name: str, acc: float | None, seed: int = 0) -> None:
    """A run folder as the launcher leaves it: config.yaml, and trajectory.h5 with /final only if it finished."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"federated:\n  seed: {seed}\n")
    with h5py.File(run / "trajectory.h5", "w") as f:
        f.create_group("rounds")
        if acc is not None:
            f.create_group("final").attrs["discrete_acc"] = acc


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    # 8 wins of 12: 2 * (C(12,0) + ... + C(12,4)) / 2^12 = 2 * 794 / 4096
    assert sign_test(8, 4) == pytest.approx(2 * 794 / 4096)
    assert sign_test(4, 8) == sign_test(8, 4)
    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(3, 3) == 1.0  # the tail counts the middle twice: capped at 1
    assert sign_test(0, 0) == 1.0


def test_pool_counts_ties_apart_and_gives_the_mean_and_its_standard_error():
    s = pool([1.0, -2.0, 0.004, 3.0])

    assert (s.n, s.wins, s.losses) == (4, 2, 1)
    assert s.mean == pytest.approx(2.004 / 4)
    sd = math.sqrt(sum((d - s.mean) ** 2 for d in [1.0, -2.0, 0.004, 3.0]) / 3)
    assert s.sem == pytest.approx(sd / 2)
    assert s.sign_p == pytest.approx(sign_test(2, 1))
    assert math.isnan(pool([1.0]).sem)


def test_pairs_match_settings_within_a_folder_and_skip_unfinished_or_missing_twins(tmp_path):
    seed1 = tmp_path / "seed1"
    fake_run(seed1, "when_fmnist_a0.1_steps30", 0.6796, seed=1)
    fake_run(seed1, "when_fmnist_a0.1_sgd_lr0.1", 0.6498, seed=1)
    fake_run(seed1, "when_mnist_a0.5_steps30", 0.9689, seed=1)
    fake_run(seed1, "when_mnist_a0.5_sgd_lr0.1", None, seed=1)  # still running: no /final
    fake_run(seed1, "when_fmnist_iid_sgd_lr0.1", 0.8419, seed=1)  # its base never ran
    fake_run(seed1, "off_fmnist_shards2_steps30", 0.6799, seed=1)
    fake_run(seed1, "off_fmnist_shards2_sgd_lr0.1", 0.6732, seed=1)
    fake_run(seed1, "when_fmnist_a0.1_sgd_lr0.1_warm10", 0.6516, seed=1)  # another variant: not a candidate run

    found = pairs(seed1, "steps30", "sgd_lr0.1")

    assert [(p.setting, p.seed) for p in found] == [("fmnist_a0.1", 1), ("fmnist_shards2", 1)]
    assert found[0].difference == pytest.approx(64.98 - 67.96)


def test_main_prints_each_pair_and_the_pooled_line_and_refuses_folders_without_pairs(tmp_path, capsys):
    for seed, (a, b) in enumerate([(0.7622, 0.7746), (0.6796, 0.6516)]):
        fake_run(tmp_path / f"s{seed}", "when_fmnist_a0.1_steps30", a, seed)
        fake_run(tmp_path / f"s{seed}", "when_fmnist_a0.1_warm", b, seed)

    main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s1"), "--base", "steps30", "--candidate", "warm"])

    out = capsys.readouterr().out
    assert "| s0 | fmnist_a0.1 | 0 | 76.22 | 77.46 | +1.24 |" in out
    assert "| s1 | fmnist_a0.1 | 1 | 67.96 | 65.16 | -2.80 |" in out
    assert "2 pairs: warm wins 1, loses 1; mean difference -0.78 points" in out
    with pytest.raises(SystemExit, match=r"^error: --runs: no setting has finished runs of both"):
        main(["--runs", str(tmp_path / "s0"), "--base", "steps30", "--candidate", "nothing"])

"""Relaxations of a categorical row, temperature schedules and soft-pruning masks."""

import math

import pytest
import torch

from fedmetanas.search.relax import entropy, gumbel_noise, lr_factor, probabilities, relax, temperature, update_mask

SCHEDULES = ["linear", "exponential", "cosine"]


def _logits(rows: int = 5, k: int = 6, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


def _mask(rows: int = 5, k: int = 6, seed: int = 1) -> torch.Tensor:
    """A random mask with at least one kept entry (column 0 if nothing else) per row."""
    m = torch.rand(rows, k, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[~m.any(dim=1), 0] = True
    return m


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Reference written independently: exp over kept entries, normalised per row."""
    e = torch.exp((logits - logits.max(dim=1, keepdim=True).values) / tau) * mask
    return e / e.sum(dim=1, keepdim=True)


# -- temperature schedules ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_starts_at_tau_max_and_ends_at_tau_min(schedule):
    assert temperature(schedule, 2.0, 0.1, 0, 10) == pytest.approx(2.0, abs=1e-12)
    assert temperature(schedule, 2.0, 0.1, 9, 10) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_is_monotone_non_increasing(schedule):
    taus = [temperature(schedule, 1.5, 0.05, s, 20) for s in range(25)]

    assert all(b <= a + 1e-15 for a, b in zip(taus, taus[1:]))
    assert taus[0] > taus[-1]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_clamps_at_tau_min_past_the_total(schedule):
    assert [temperature(schedule, 1.0, 0.2, s, 3) for s in (2, 3, 7, 100)] == pytest.approx([0.2] * 4, abs=1e-12)


@pytest.mark.parametrize(("schedule", "midpoint"),
                         [("linear", (2.0 + 0.5) / 2), ("exponential", math.sqrt(2.0 * 0.5)),
                          ("cosine", (2.0 + 0.5) / 2)])
def test_schedule_midpoints_follow_their_formula(schedule, midpoint):
    assert temperature(schedule, 2.0, 0.5, 5, 11) == pytest.approx(midpoint, abs=1e-12)


def test_cosine_schedule_is_flat_at_both_ends():
    # The cosine schedule changes less in its first step than the linear one does.
    first_cos = 1.0 - temperature("cosine", 1.0, 0.01, 1, 101)
    first_lin = 1.0 - temperature("linear", 1.0, 0.01, 1, 101)

    assert first_cos < first_lin / 10


def test_unknown_schedule_raises_value_error_naming_the_field():
    with pytest.raises(ValueError, match="search.tau_schedule"):
        temperature("linaer", 1.0, 0.1, 0, 10)


def test_constant_lr_schedule_is_one_everywhere():
    assert [lr_factor("constant", 0.05, s, 10) for s in (0, 5, 9, 50)] == [1.0] * 4


def test_cosine_lr_schedule_runs_from_one_to_the_min_factor_and_stays():
    factors = [lr_factor("cosine", 0.05, s, 11) for s in range(15)]

    assert factors[0] == pytest.approx(1.0, abs=1e-12)
    assert factors[5] == pytest.approx((1.0 + 0.05) / 2, abs=1e-12)
    assert factors[10:] == pytest.approx([0.05] * 5, abs=1e-12)
    assert all(b <= a + 1e-15 for a, b in zip(factors, factors[1:]))


def test_warmup_ramps_linearly_then_runs_the_schedule_over_the_remaining_steps():
    factors = [lr_factor("cosine", 0.05, s, 14, warmup=3) for s in range(16)]

    assert factors[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4], abs=1e-12)
    assert factors[3:] == pytest.approx([lr_factor("cosine", 0.05, s, 11) for s in range(13)], abs=1e-12)
    assert [lr_factor("constant", 0.05, s, 10, warmup=1) for s in (0, 1, 9)] == [0.5, 1.0, 1.0]


def test_no_warmup_is_the_plain_schedule_bit_for_bit():
    assert all(lr_factor("cosine", 0.05, s, 11, warmup=0) == lr_factor("cosine", 0.05, s, 11) for s in range(15))


# -- relax --------------------------------------------------------------------------------------
def test_soft_rows_sum_to_one_and_masked_entries_are_exactly_zero():
    logits, mask = _logits(), _mask()
    noise = gumbel_noise(tuple(logits.shape), torch.Generator().manual_seed(3))

    w, active = relax(logits, mask, 0.7, "soft", noise)

    assert torch.allclose(w.sum(dim=1), torch.ones(5), atol=1e-6)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert (w[mask] > 0).all()
    assert torch.equal(active, mask)
    assert torch.allclose(w, _masked_softmax(logits + noise, mask, 0.7), atol=1e-6)


def test_hard_sample_is_one_hot_at_the_argmax_of_logits_plus_noise():
    logits, mask = _logits(), _mask()
    noise = gumbel_noise(tuple(logits.shape), torch.Generator().manual_seed(4))

    w, active = relax(logits, mask, 0.5, "hard", noise)

    expected_index = (logits + noise).masked_fill(~mask, float("-inf")).argmax(dim=1)
    onehot = torch.nn.functional.one_hot(expected_index, 6).float()
    assert torch.allclose(w, onehot, atol=1e-6)
    assert active.dtype == torch.bool
    assert active.sum(dim=1).tolist() == [1] * 5
    assert torch.equal(active, onehot.bool())
    assert not (active & ~mask).any()


def test_hard_sample_gradient_is_the_soft_sample_gradient():
    # Straight-through estimator: forward one-hot, backward d(soft)/d(logits).
    logits, mask = _logits(), _mask()
    noise = gumbel_noise(tuple(logits.shape), torch.Generator().manual_seed(5))
    coeff = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    hard_logits = logits.clone().requires_grad_(True)
    soft_logits = logits.clone().requires_grad_(True)

    (relax(hard_logits, mask, 0.8, "hard", noise)[0] * coeff).sum().backward()
    (relax(soft_logits, mask, 0.8, "soft", noise)[0] * coeff).sum().backward()

    assert hard_logits.grad.abs().sum() > 0
    assert torch.allclose(hard_logits.grad, soft_logits.grad, atol=1e-6)
    assert torch.equal(hard_logits.grad[~mask], torch.zeros(int((~mask).sum())))


def test_gumbel_modes_require_noise():
    with pytest.raises(ValueError, match="noise"):
        relax(_logits(), _mask(), 1.0, "hard")


def test_expected_mode_is_the_noise_free_softmax():
    logits, mask = _logits(), _mask()
    noise = 10 * gumbel_noise(tuple(logits.shape), torch.Generator().manual_seed(7))

    w_without, active = relax(logits, mask, 0.5, "expected")
    w_with, _ = relax(logits, mask, 0.5, "expected", noise)

    assert torch.equal(w_without, w_with)
    assert torch.allclose(w_without, _masked_softmax(logits, mask, 0.5), atol=1e-6)
    assert torch.equal(active, mask)


def test_argmax_mode_is_a_constant_one_hot_of_the_best_kept_entry():
    logits, mask = _logits(), _mask()
    logits = logits.masked_fill(~mask, 100.0)  # the largest logits are pruned: must not be picked
    logits.requires_grad_(True)

    w, active = relax(logits, mask, 0.5, "argmax")

    best = logits.detach().masked_fill(~mask, float("-inf")).argmax(dim=1)
    assert torch.equal(w, torch.nn.functional.one_hot(best, 6).float())
    assert torch.equal(active, w.bool())
    assert not w.requires_grad


# -- soft pruning -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_update_mask_only_shrinks_and_keeps_each_rows_best_entry(seed):
    logits, mask = _logits(rows=8, seed=seed, scale=3.0), _mask(rows=8, seed=seed + 100)

    new = update_mask(logits, mask, 0.5, threshold=0.2)

    assert not (new & ~mask).any()
    best = logits.masked_fill(~mask, float("-inf")).argmax(dim=1)
    assert new[torch.arange(8), best].all()


@pytest.mark.parametrize("seed", range(5))
def test_update_mask_drops_exactly_the_entries_below_the_threshold(seed):
    logits, mask = _logits(rows=8, seed=seed, scale=3.0), _mask(rows=8, seed=seed + 100)
    tau, threshold = 0.7, 0.1

    new = update_mask(logits, mask, tau, threshold)

    probs = _masked_softmax(logits, mask, tau)
    expected = (probs >= threshold) & mask
    expected[torch.arange(8), probs.argmax(dim=1)] = True
    assert torch.equal(new, expected)
    assert (new.sum(dim=1) < mask.sum(dim=1)).any()  # the case is not vacuous


def test_update_mask_with_zero_threshold_keeps_everything_and_copies():
    logits, mask = _logits(scale=50.0), _mask()

    new = update_mask(logits, mask, 0.1, threshold=0.0)

    assert torch.equal(new, mask)
    new[:] = False
    assert mask.any()  # a copy, not a view of the caller's mask


def test_probabilities_ignore_gradients_and_masked_entries():
    logits, mask = _logits().requires_grad_(True), _mask()

    p = probabilities(logits, mask, 0.3)

    assert not p.requires_grad
    assert torch.allclose(p, _masked_softmax(logits.detach(), mask, 0.3), atol=1e-6)


def test_entropy_of_uniform_rows_is_log_of_the_kept_count():
    logits, mask = torch.zeros(5, 6), _mask()

    h = entropy(logits, mask, 0.4)

    assert torch.allclose(h, torch.log(mask.sum(dim=1).float()), atol=1e-6)


def test_entropy_of_a_peaked_row_is_near_zero():
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0]])

    h = entropy(logits, torch.ones(1, 4, dtype=torch.bool), 1.0)

    assert 0.0 <= float(h[0]) < 1e-6


def test_gumbel_noise_is_reproducible_from_the_generator_alone():
    before = torch.get_rng_state()

    a = gumbel_noise((4, 7), torch.Generator().manual_seed(11))
    b = gumbel_noise((4, 7), torch.Generator().manual_seed(11))
    c = gumbel_noise((4, 7), torch.Generator().manual_seed(12))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    assert torch.equal(torch.get_rng_state(), before)


def test_gumbel_noise_has_the_standard_gumbel_mean():
    # E[Gumbel(0, 1)] is the Euler-Mascheroni constant 0.5772; std pi/sqrt(6) ~ 1.28.
    x = gumbel_noise((200_000,), torch.Generator().manual_seed(0))

    assert float(x.mean()) == pytest.approx(0.5772, abs=0.02)
    assert float(x.std()) == pytest.approx(math.pi / math.sqrt(6), abs=0.02)


def test_gumbel_noise_is_drawn_where_its_generator_lives_and_returned_on_the_host() -> None:
    # A generator on an explicit CPU device gives the same numbers as the default one; a GPU's own generator
    # (pytest -m gpu: test_gumbel_noise_from_a_cuda_generator) is drawn on the GPU.
    a = gumbel_noise((5, 3), torch.Generator().manual_seed(3))
    b = gumbel_noise((5, 3), torch.Generator(device="cpu").manual_seed(3))
    assert a.device.type == "cpu" and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gumbel_noise_from_a_cuda_generator() -> None:
    from fedmetanas.search.stacked import _gumbel_rows

    gen = torch.Generator(device="cuda").manual_seed(3)
    z = gumbel_noise((7,), gen)
    rows = _gumbel_rows(7, [torch.Generator(device="cuda").manual_seed(3)], torch.device("cuda"))
    assert z.device.type == "cpu" and rows.device.type == "cuda"
    assert torch.equal(rows[0].cpu(), z) and torch.isfinite(z).all()

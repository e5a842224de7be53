"""How many clients a rank steps together (`federated/batching.py`): an explicit K is the user's, `auto` runs
one client after another on a CPU (measured slower batched there) and, on a GPU, fits the batch to memory
from a probe's measured bytes per client; the reason is always given."""

from __future__ import annotations

import torch

from fedmetanas.federated.batching import MEMORY_SHARE, choose, fit_client_batch


def test_the_batch_fills_its_share_of_memory_and_never_exceeds_the_round() -> None:
    gib = 2**30
    assert fit_client_batch(1 * gib, 2 * gib, 100 * gib, 1000) == int((MEMORY_SHARE * 100 - 2) // 1)
    assert fit_client_batch(1 * gib, 2 * gib, 100 * gib, 10) == 10  # no more than the round's clients
    assert fit_client_batch(200 * gib, 0, 100 * gib, 10) == 1  # even one client over budget: one at a time
    assert fit_client_batch(0, 0, 100 * gib, 7) == 7


def test_an_explicit_batch_is_the_users_and_says_so() -> None:
    cpu = torch.device("cpu")
    assert choose(4, cpu, True, 10).k == 4
    assert "runtime.client_batch 4" in choose(4, cpu, True, 10).why
    assert choose(1, cpu, True, 10).k == 1
    assert choose(4, cpu, False, 10).k == 1


def test_auto_on_a_cpu_is_one_client_after_another_with_the_reason() -> None:
    got = choose("auto", torch.device("cpu"), True, 10, probe=lambda k: 1 / 0)  # the probe is never run on a CPU
    assert got.k == 1 and "auto on a CPU" in got.why
    assert choose("auto", torch.device("cpu"), False, 10).why == "auto: this phase has no batched form"

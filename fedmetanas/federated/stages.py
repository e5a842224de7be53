"""The run's phases on one round counter: which one is current, where each one ended, the spans.

A phase may end early (`Phase.end_early`); the later phases' spans then follow it, so the run's length
(`total`) is what the spans say now, not what was planned. Spans are frozen dataclasses: replaced, never
edited. The ends go into every checkpoint; a resume replays them (`restore`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedmetanas.algorithms.base import Phase


class Stages:
    """The phases of a run, in order, and the index of the current one."""

    def __init__(self, phases: list[Phase]) -> None:
        self.phases = phases
        self.index = 0
        self.ends: list[int] = []  # the round each ended phase ended at (one past its last round)

    @property
    def current(self) -> Phase:
        return self.phases[self.index]

    @property
    def has_next(self) -> bool:
        return self.index + 1 < len(self.phases)

    @property
    def total(self) -> int:
        """Rounds of the whole run as the phases' spans now stand (an early phase end shortens it)."""
        return self.phases[-1].span.end

    def of(self, rnd: int) -> int:
        """The index of the phase round `rnd` falls in."""
        return next((i for i, p in enumerate(self.phases) if rnd < p.span.end), len(self.phases) - 1)

    def close(self, index: int, end: int) -> None:
        """Phase `index` ends at round `end` (its last round is `end - 1`): cut its span there and move the
        later phases' spans to follow it."""
        span = self.phases[index].span
        if end != span.end:
            self.phases[index].span = dataclasses.replace(span, rounds=end - span.first)
        for before, after in zip(self.phases[index:], self.phases[index + 1:]):
            after.span = dataclasses.replace(after.span, first=before.span.end)

    def end_current(self, end: int) -> None:
        """The current phase ended at round `end`: its span closes there and the end is kept."""
        self.close(self.index, end)
        self.ends.append(end)

    def restore(self, ends: list[int]) -> None:
        """The ends a checkpoint kept, replayed onto the spans."""
        self.ends = [int(e) for e in ends]
        for i, end in enumerate(self.ends):
            self.close(i, end)

    def planned(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p.span) for p in self.phases]

    def run_so_far(self, end_round: int) -> list[dict[str, Any]]:
        """The spans of the phases run so far, the current one up to `end_round` (one past the last run)."""
        spans = [p.span for p in self.phases[:self.index + 1]]
        spans[-1] = dataclasses.replace(spans[-1], rounds=max(end_round, spans[-1].first) - spans[-1].first)
        return [dataclasses.asdict(s) for s in spans]

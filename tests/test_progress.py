"""Progress lines: bounded in number, and an ETA that follows the recent rate."""

from __future__ import annotations

import pytest

from pipeline.core import progress as progress_module
from pipeline.core.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_follows_the_recent_rate_after_a_cached_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """90 items from the cache in 1 s, then 1 item per 10 s: after a few slow reports the ETA is the
    slow rate's (about 10 s per item left), not the average since the start (about 2 s per item)."""
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    lines: list[str] = []
    bar = Progress("items", 200, lines.append, every_s=10.0)
    clock.now = 1.0
    bar.step(90)  # within every_s of the start: no line yet
    assert lines == []
    for _ in range(5):
        clock.now += 10.0
        bar.step()
    # 95 done after 51 s: the average since the start would say 105 x 51/95 s = 56 s; the last
    # four reports saw 4 items in 40 s, so 105 items take about 1050 s = 18 min.
    assert lines[-1] == "items: 95/200, about 18 min left", lines
    assert len(lines) == 5


def test_lines_are_bounded_and_the_last_says_how_long_it_took(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    lines: list[str] = []
    bar = Progress("units", 1000, lines.append, every_s=10.0)
    for _ in range(1000):
        clock.now += 0.05  # 50 s in all: a line every 10 s, and the last one
        bar.step()
    assert len(lines) <= 6
    assert lines[-1] == "units: 1000/1000 in 50 s"

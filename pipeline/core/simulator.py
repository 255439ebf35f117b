"""What every simulator does: predict a neuron's 0-10 level at each token from an explanation.

A simulator returns, per sequence, the expected level at each token (a float in [0, 10]) — or an
`LLMFailure` for the whole explanation, so one bad neuron is recorded and the layer goes on.

`simulate_many` takes many (explanation, sequences) jobs at once, e.g. every candidate of a layer:
a server simulator keeps all of its slots busy with the sequences of many units. Each job's result
goes to `on_result` as soon as it is final (progress); the server backend caches each request as
it arrives, so a killed run resumes.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from pipeline.core.llm import LLMFailure, Usage

LEVELS = tuple(range(11))


class Job(NamedTuple):
    """One explanation to simulate on some sequences."""

    explanation: str
    sequences: Sequence[Sequence[str]]


# Per job: levels per sequence (a sequence may fail alone), or one failure for the whole job.
JobResult = list[np.ndarray | LLMFailure] | LLMFailure
OnJob = Callable[[int, JobResult], None]


class Simulator(ABC):
    """`backend`, `model` and `prompt_version` name the simulator in the warehouse's lineage."""

    backend: str
    model: str
    prompt_version: str

    @property
    def usage(self) -> Usage:
        """Requests, tokens and cache hits spent simulating (shared with the backend it calls, if any)."""
        if "_usage" not in self.__dict__:
            self.__dict__["_usage"] = Usage()
        return self.__dict__["_usage"]

    @abstractmethod
    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        """Expected level per token of each sequence (same lengths as the sequences)."""

    def simulate_each(
        self, explanation: str, sequences: Sequence[Sequence[str]]
    ) -> list[np.ndarray | LLMFailure] | LLMFailure:
        """Like `simulate`, but a simulator that asks per sequence may fail one sequence alone."""
        return self.simulate(explanation, sequences)

    def simulate_many(self, jobs: Sequence[Job], on_result: OnJob | None = None) -> list[JobResult]:
        """`simulate_each` of every job, in order; `on_result(index, result)` as each one finishes.
        This default runs them one after another; simulators that can overlap jobs override it."""
        out: list[JobResult] = []
        for i, job in enumerate(jobs):
            result = self.simulate_each(job.explanation, job.sequences)
            if on_result is not None:
                on_result(i, result)
            out.append(result)
        return out


def expected_level(probs: Mapping[int, float]) -> float | None:
    """Expected value over 0..10 from (unnormalized) probabilities of some levels; None if they sum to 0."""
    total = sum(p for v, p in probs.items() if v in LEVELS)
    if not total > 0:
        return None
    return float(sum(v * p for v, p in probs.items() if v in LEVELS) / total)


@functools.lru_cache(maxsize=4096)  # a few distinct candidates, read at every slot of every sequence
def parse_level(token: str) -> int | None:
    """The level a (possibly space-padded) token spells, if it is one of 0..10."""
    text = token.strip()
    if text.isascii() and text.isdigit() and int(text) in LEVELS and text == str(int(text)):
        return int(text)
    return None

"""What every simulator does: predict a neuron's 0-10 level at each token from an explanation.

A simulator returns, per sequence, the expected level at each token (a float in [0, 10]) — or an
`LLMFailure` for the whole explanation, so one bad neuron is recorded and the layer goes on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.llm import LLMFailure, Usage

LEVELS = tuple(range(11))


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


def expected_level(probs: Mapping[int, float]) -> float | None:
    """Expected value over 0..10 from (unnormalized) probabilities of some levels; None if they sum to 0."""
    total = sum(p for v, p in probs.items() if v in LEVELS)
    if not total > 0:
        return None
    return float(sum(v * p for v, p in probs.items() if v in LEVELS) / total)


def parse_level(token: str) -> int | None:
    """The level a (possibly space-padded) token spells, if it is one of 0..10."""
    text = token.strip()
    if text.isascii() and text.isdigit() and int(text) in LEVELS and text == str(int(text)):
        return int(text)
    return None

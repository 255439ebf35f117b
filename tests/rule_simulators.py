"""Simulators that are rules, not models, so a test's expected outcome is certain:
- `QuotedTokens` follows an explanation: level 10 on the tokens it quotes, 0 elsewhere.
- `ShiftedQuotedTokens` follows it on another scale (levels 3 and 8).
- `Blind` ignores the explanation (the same guess whatever it is told).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from assets.resources import SimulatorResource
from pipeline.llm import LLMFailure
from pipeline.simulator import Simulator


def quoted(explanation: str) -> set[str]:
    return {m.encode("ascii").decode("unicode_escape") for m in re.findall(r'"((?:[^"\\]|\\.)*)"', explanation)}


class QuotedTokens(Simulator):
    backend, model, prompt_version = "rule", "quoted-tokens", "rule-v1"
    low, high = 0.0, 10.0

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        named = quoted(explanation)
        return [np.array([self.high if t in named else self.low for t in seq]) for seq in sequences]


class ShiftedQuotedTokens(QuotedTokens):
    model = "shifted-quoted-tokens"
    low, high = 3.0, 8.0


class Blind(Simulator):
    backend, model, prompt_version = "rule", "blind", "rule-v1"

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        return [np.array([float(zlib.crc32(t.encode()) % 11) for t in seq]) for seq in sequences]


RULES = {"quoted": QuotedTokens, "shifted": ShiftedQuotedTokens, "blind": Blind}


class RuleSimulator(SimulatorResource):
    """A rule simulates (the loopback server explains, always with the same reply)."""

    rule: str = "quoted"

    def client(self) -> Simulator:
        return RULES[self.rule]()

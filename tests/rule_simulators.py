"""Simulators that are rules, not models, so a test's expected outcome is certain:
- `QuotedTokens` follows an explanation: level 10 on the tokens it quotes, 0 elsewhere.
- `ShiftedQuotedTokens` follows it on another scale (levels 3 and 8).
- `Blind` ignores the explanation (the same guess whatever it is told).
And the detection/fuzzing scorers as rules (`RuleSimulator.classifier`):
- `QuotedRule` follows an explanation: a text activates the unit when it holds a token the
  explanation quotes (detection); a marking is right when every marked token is quoted (fuzzing).
- `BlindRule` ignores the explanation: its labels hash the text.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from assets.resources import SimulatorResource
from pipeline.core.classify import DETECTION, Answer, Classifier, Shown, render
from pipeline.core.llm import LLMFailure
from pipeline.core.simulator import Simulator


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


class QuotedRule(Classifier):
    backend, model, prompt_version = "rule", "quoted-tokens", "rule-v1"

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        named = quoted(explanation)
        out: list[Answer | LLMFailure] = []
        for shown in prompts:
            if scorer == DETECTION:
                labels = [int(any(t in named for t in s.tokens)) for s in shown]
            else:
                marked = [[t for t, m in zip(s.tokens, s.marked or (), strict=True) if m] for s in shown]
                labels = [int(all(t in named for t in m)) for m in marked]
            out.append(Answer(list(labels), [0.25 + 0.5 * v for v in labels], 10 * len(shown), 2 * len(shown)))
        return out


class BlindRule(Classifier):
    backend, model, prompt_version = "rule", "blind", "rule-v1"

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        out: list[Answer | LLMFailure] = []
        for shown in prompts:
            hashes = [zlib.crc32(render(s).encode()) for s in shown]
            out.append(Answer([h % 2 for h in hashes], [(h % 1000) / 1000 for h in hashes], 1, 1))
        return out


CLASSIFIER_RULES = {"quoted": QuotedRule, "shifted": QuotedRule, "blind": BlindRule}


class RuleSimulator(SimulatorResource):
    """A rule simulates and classifies (the loopback server explains, always with the same reply)."""

    rule: str = "quoted"

    def client(self) -> Simulator:
        return RULES[self.rule]()

    def classifier(self) -> Classifier:
        return CLASSIFIER_RULES[self.rule]()

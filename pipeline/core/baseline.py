"""The paper's token-space baseline: explain a unit by the tokens that most activate it.

Two uses of the same top tokens (`unit_examples.top_tokens`, built from the train and calibration
splits only, so held-out sequences stay unseen):
- `token_space_explanation`: the tokens as text, an explanation like any other, judged by the SAME
  simulator as the LLM's explanations (as in the paper), so "LLM vs token space" compares
  explanations, not simulators;
- `TokenLookupSimulator`: a separately named reference that ignores text and looks each token up in
  the table, exactly. It shows what the top tokens alone could score with a perfect simulator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.core.llm import LLMFailure
from pipeline.core.simulator import Simulator

TOKEN_SPACE_VERSION = "token-space-v1"


def token_space_explanation(top_tokens: Sequence[Mapping], n: int | None = None) -> str | None:
    """'tokens "7", "9", ...' (escaped so whitespace tokens stay visible); None for a dead unit."""
    shown = [t["token"] for t in top_tokens[:n]]
    if not shown:
        return None
    quoted = ", ".join('"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"' for s in shown)
    return f"tokens {quoted}"


class TokenLookupSimulator(Simulator):
    backend = "baseline"
    model = "token-lookup"
    prompt_version = "token-lookup-v1"

    def __init__(self, top_tokens: Sequence[Mapping], max_activation: float):
        scale = 10.0 / max_activation if max_activation > 0 else 0.0

        def level(t: Mapping) -> float:
            return float(np.clip(t["mean_activation"] * scale, 0.0, 10.0))

        self.by_id = {int(t["token_id"]): level(t) for t in top_tokens}
        self.by_string = {t["token"]: level(t) for t in top_tokens}

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        return [np.array([self.by_string.get(tok, 0.0) for tok in seq], dtype=np.float64) for seq in sequences]

    def simulate_ids(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Exact: by token id (two ids may decode to the same string)."""
        return [np.array([self.by_id.get(int(i), 0.0) for i in seq], dtype=np.float64) for seq in sequences]

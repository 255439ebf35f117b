"""docs/ARCHITECTURE.md's example, run as written: `examples/explain_one_neuron.py` explains and scores
the tiny digit GPT-2's digit neuron in process (no Dagster), with a scripted explainer and the rule
simulator that follows an explanation's quoted tokens, so the outcome is certain."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest
from rule_simulators import QuotedTokens
from tiny_models import DIGIT_NEURON, DIGITS, WORDS

from pipeline.core.corpus import CorpusSpec
from pipeline.core.llm import Completion, GenerationParams, LLMBackend, LLMFailure, Prompt
from pipeline.core.records import SamplingSpec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "explain_one_neuron.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("explain_one_neuron", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scripted(LLMBackend):
    """An explainer that always writes the same line, and keeps the prompts it was shown."""

    backend, model = "scripted", "fixed-reply"

    def __init__(self, reply: str):
        self.reply, self.prompts = reply, []

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        self.prompts += prompts
        return [Completion([self.reply], prompt_tokens=0, completion_tokens=0) for _ in prompts]


def test_the_documented_example_explains_and_scores_one_neuron(digit_model_dir: Path, digit_corpus: Path) -> None:
    example = _load_example()
    corpus = CorpusSpec(source=str(digit_corpus), seq_len=16, n_sequences=64, seed=3)
    sampling = SamplingSpec(top_k=8, random_k=8, quantile_bins=2, per_quantile=2, batch_size=8)

    def run(reply: str) -> tuple[Scripted, str, float | None]:
        explainer = Scripted(reply)
        explanation, score = example.explain_and_score(
            str(digit_model_dir), corpus, sampling, 0, DIGIT_NEURON, explainer, QuotedTokens()
        )
        return explainer, explanation, score

    quoted_digits = ", ".join(f'"{d}"' for d in DIGITS)
    explainer, explanation, score = run(f" the digits {quoted_digits}.\nignored second line")
    assert explanation == f"the digits {quoted_digits}"  # the first line, without its final period
    # The explainer was shown the neuron's train top records: where it is active, only digits.
    (prompt,) = explainer.prompts
    target = prompt.rsplit("\nNeuron ", 1)[1].split("with the zeros left out:\n", 1)[1]
    active = [line.split("\t")[0].strip() for line in target.splitlines() if "\t" in line]
    assert active and set(active) <= set(DIGITS)
    # The neuron fires on digits only, more strongly for larger ones: quoting them all scores high.
    assert score is not None and score > 0.9
    # An explanation naming other tokens scores far lower on the same test sequences.
    _, _, wrong = run(" the words " + ", ".join(f'"{w}"' for w in WORDS[:5]))
    assert wrong is None or wrong < score - 0.5


def test_the_example_is_short_enough_for_the_page() -> None:
    source = EXAMPLE.read_text()
    body = source[source.index("def explain_and_score") : source.index('if __name__ == "__main__"')]
    assert len(body.strip().splitlines()) <= 30
    assert body.strip() in (EXAMPLE.parents[1] / "docs" / "ARCHITECTURE.md").read_text()


if __name__ == "__main__":
    pytest.main([__file__])

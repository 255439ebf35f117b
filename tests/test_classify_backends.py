"""The detection/fuzzing scorer backends against references computed apart from them.

- `LocalClassifier` (embedded Gemma): a unit's explanation and its control share one KV cache of the
  texts; each label's P("1") must equal a plain forward pass over the whole prompt string (with the
  labels answered so far written out), with no cache at all.
- `CachedClassifier`: a second scoring of the same prompts asks the model nothing.
- `read_labels`: a server's reply read into labels and, from the label tokens' top logprobs, P("1").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from pipeline.core.classify import DETECTION, FUZZING, Answer, Classifier, Shown, answer_text, classification_prompt
from pipeline.core.llm import ChatReply, LLMFailure
from pipeline.core.models import load_subject_model
from pipeline.infra.classify_backends import CachedClassifier, LocalClassifier, read_labels
from pipeline.infra.llm_cache import LLMCache

PROMPT = [
    Shown(("The", " cat", " sat", " on", " 3", " mats", "."), (False, False, False, False, True, False, False)),
    Shown(("We", " ate", " 12", " eggs", "."), (False, True, False, False, False)),
    Shown(("Nothing", " here", " at", " all", "."), (False, False, False, True, False)),
]
EXPLANATIONS = ["numbers written with digits", "words about food and cooking"]


def test_shared_texts_give_the_labels_of_a_plain_forward_pass() -> None:
    """Fuzzing (the longer prompt, with marks); two texts keep the reference passes few."""
    gemma = load_subject_model("embedded")
    scorer, shown = FUZZING, PROMPT[:2]
    classifier = LocalClassifier(gemma.model, gemma.tokenizer, "embedded")
    answers = classifier.classify_each(scorer, EXPLANATIONS, [shown])
    assert len(answers) == 2
    zero, one = (gemma.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("0", "1"))
    for explanation, (answer,) in zip(EXPLANATIONS, answers, strict=True):
        assert isinstance(answer, Answer) and len(answer.labels) == len(shown)
        for k in range(len(shown)):
            # The prompt as one string, the labels answered so far written as the list continues.
            text = classification_prompt(scorer, explanation, shown)
            if k:
                text += answer_text(answer.labels[:k])[1:-1] + ", "
            ids = gemma.tokenizer(text, return_tensors="pt").input_ids
            with torch.inference_mode():
                logits = gemma.model(input_ids=ids).logits[0, -1].double()
            p1 = float(torch.softmax(torch.stack([logits[zero], logits[one]]), dim=0)[1])
            assert answer.probabilities[k] == pytest.approx(p1, abs=2e-3), (scorer, explanation, k)
            assert answer.labels[k] == int(answer.probabilities[k] > 0.5)
        assert answer.prompt_tokens == len(gemma.tokenizer(classification_prompt(scorer, explanation, shown)).input_ids)
    # Each explanation counts as its own request, as on a server.
    assert classifier.usage.snapshot()["requests"] == 2


class Counting(Classifier):
    """Answers 1 for every text and counts the prompts it was asked."""

    backend, model, prompt_version = "rule", "ones", "rule-v1"

    def __init__(self) -> None:
        self.asked = 0

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        self.asked += len(prompts)
        return [Answer([1] * len(p), None, 7, 3) for p in prompts]


def test_the_cache_answers_a_second_scoring_without_asking(tmp_path: object) -> None:
    inner = Counting()
    cached = CachedClassifier(inner, LLMCache(tmp_path / "cache.sqlite"))
    first = cached.classify_each(DETECTION, EXPLANATIONS, [PROMPT, PROMPT[:2]])
    assert inner.asked == 4 and not any(a.cached for row in first for a in row)
    again = cached.classify_each(DETECTION, [*EXPLANATIONS, "a third one"], [PROMPT, PROMPT[:2]])
    assert inner.asked == 6  # only the new explanation's two prompts
    assert [[a.labels for a in row] for row in again[:2]] == [[a.labels for a in row] for row in first]
    assert all(a.cached for row in again[:2] for a in row) and not any(a.cached for a in again[2])


def _reply(text: str, pieces: list[tuple[str, dict[str, float]]]) -> ChatReply:
    return ChatReply(text, [(p.encode(), top) for p, top in pieces], prompt_tokens=11, completion_tokens=len(pieces))


def test_a_server_reply_is_read_into_labels_and_their_probabilities() -> None:
    # A completion after "Answer: [": tokens "1", ",", " 0", "]" with their top logprobs.
    pieces = [
        ("1", {"1": math.log(0.8), "0": math.log(0.2)}),
        (",", {",": 0.0}),
        (" 0", {" 0": math.log(0.6), " 1": math.log(0.3), " 2": math.log(0.1)}),
    ]
    read = read_labels(_reply("1, 0", pieces), n=2, logprobs=True, opened=True)
    assert read["labels"] == [1, 0]
    assert read["probabilities"] == pytest.approx([0.8, 0.3 / 0.9])
    assert read["prompt_tokens"] == 11
    # A chat reply with words around the list; no logprobs asked.
    assert read_labels(_reply("Sure: [0, 1, 1]", []), n=3, logprobs=False, opened=False)["labels"] == [0, 1, 1]
    # Wrong count and a non-label are unreadable, with the reason.
    assert "2 labels for 3 texts" in read_labels(_reply("1, 0", pieces), n=3, logprobs=True, opened=True)["bad"]
    assert "not a label" in read_labels(_reply("[1, maybe]", []), n=2, logprobs=False, opened=False)["bad"]

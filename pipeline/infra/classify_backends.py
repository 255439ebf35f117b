"""The detection/fuzzing scorer model behind every backend, with the response cache.

- `LocalClassifier`: an in-process causal LM (the embedded Gemma, or any local checkpoint). The
  completion-style prompt ends with "Answer: ["; at each label the model's logits give
  P("1") / (P("0") + P("1")); its answer is the likelier label, which is written (with ", " or "]")
  before the next label is read, so each label sees the model's own earlier answers, as in a
  generated list. One forward pass over the prompt, then one short pass per label on the KV cache.
- `ServerClassifier`: any OpenAI-compatible server, on /completions (the same prompt, continued
  until "]") or /chat/completions (the prompt as turns; the reply holds the list). With logprobs,
  each label's probability is read from its token's top logprobs; without, the labels as written.
- `CachedClassifier`: every answered prompt of an in-process classifier stored in the LLM cache
  (the server classifier caches per request in `OpenAIBackend`).
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.core.classify import (
    CLASSIFY_CHAT_VERSION,
    CLASSIFY_VERSION,
    Answer,
    Classifier,
    Shown,
    cache_prompt,
    classification_messages,
    classification_prompt,
    classification_prompt_parts,
)
from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import ChatReply, GenerationParams, LLMFailure, Usage
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_openai import OpenAIBackend

LABELS_READ = "label-list-v1"  # what the server classifier's cache entries hold: bump if the reading changes
LABEL_TOP_LOGPROBS = 5  # P("0") and P("1") are among a label token's top 5 (OpenAI's legacy completions cap)


class LocalClassifier(Classifier):
    backend = "local"
    prompt_version = CLASSIFY_VERSION

    def __init__(self, lm: Any, tokenizer: Any, model_name: str):
        self.lm, self.tokenizer, self.model = lm.eval(), tokenizer, model_name
        self.device = next(lm.parameters()).device

        def single(text: str) -> int:
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) != 1:
                raise AtlasInputError(f"the scorer's tokenizer spells the label {text!r} as {len(ids)} tokens, not one")
            return ids[0]

        self.label_ids = (single("0"), single("1"))
        self.sep = list(tokenizer.encode(", ", add_special_tokens=False))
        self.end = list(tokenizer.encode("]", add_special_tokens=False))

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        return self.classify_each(scorer, [explanation], prompts)[0]

    def classify_each(
        self, scorer: str, explanations: Sequence[str], prompts: Sequence[Sequence[Shown]]
    ) -> list[list[Answer | LLMFailure]]:
        """Per prompt, the texts once (their KV cache copied for each explanation), then each
        explanation's description and labels. Each explanation counts one request per prompt, with
        the tokens a server would have read: the whole prompt."""
        out: list[list[Answer | LLMFailure]] = [[] for _ in explanations]
        for shown in prompts:
            try:
                answers = self._prompt(scorer, explanations, shown)
            except torch.OutOfMemoryError as exc:
                answers = [LLMFailure(f"out of memory while classifying: {exc}")] * len(explanations)
            for j, answer in enumerate(answers):
                out[j].append(answer)
        return out

    @torch.inference_mode()
    def _prompt(self, scorer: str, explanations: Sequence[str], shown: Sequence[Shown]) -> list[Answer | LLMFailure]:
        shared, _ = classification_prompt_parts(scorer, explanations[0], shown)
        ids = self.tokenizer(shared, return_tensors="pt").input_ids.to(self.device)
        base = self.lm(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        answers: list[Answer | LLMFailure] = []
        for explanation in explanations:
            own = classification_prompt_parts(scorer, explanation, shown)[1]
            own_ids = list(self.tokenizer.encode(own, add_special_tokens=False))
            labels, probs, written = self._labels(copy.deepcopy(base), own_ids, len(shown))
            prompt_tokens = int(ids.shape[1]) + len(own_ids)
            self.usage.add(requests=1, prompt_tokens=prompt_tokens, completion_tokens=written)
            answers.append(Answer(labels, probs, prompt_tokens, written))
        return answers

    def _labels(self, cache: Any, ids: list[int], n: int) -> tuple[list[int | None], list[float | None], int]:
        """Read n labels after `ids`, writing each likelier label (and ", " or "]") before the next."""
        labels: list[int | None] = []
        probs: list[float | None] = []
        written = 0
        step = ids
        for k in range(n):
            out = self.lm(
                input_ids=torch.tensor([step], device=self.device), past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
            cache, logits = out.past_key_values, out.logits[0, -1]
            pair = torch.stack([logits[self.label_ids[0]], logits[self.label_ids[1]]]).double()
            p1 = float(torch.softmax(pair, dim=0)[1])
            label = int(p1 > 0.5)
            labels.append(label)
            probs.append(round(p1, 9))
            step = [self.label_ids[label], *(self.sep if k < n - 1 else self.end)]
            written += len(step)
        return labels, probs, written


def _binary(top: dict[str, float], before: str) -> tuple[float, float]:
    """P("0") and P("1") among the top candidates that start with `before` (spellings such as " 1"
    or "1," add up)."""
    p = [0.0, 0.0]
    for token, logprob in top.items():
        if not token.startswith(before):
            continue
        rest = token[len(before) :].strip().rstrip(",]").strip()
        if rest in ("0", "1"):
            p[int(rest)] += math.exp(logprob)
    return p[0], p[1]


def label_probabilities(reply: ChatReply, positions: Sequence[int]) -> list[float | None] | None:
    """P(label 1) at each label's character position in the reply's text, from its token's top
    logprobs; None where the reply's tokens do not spell its text."""
    text = reply.text
    if not reply.tokens or not b"".join(d for d, _ in reply.tokens).startswith(text.encode("utf-8")):
        return None
    starts, pos = [], 0
    for data, _ in reply.tokens:
        starts.append(pos)
        pos += len(data)
    out: list[float | None] = []
    for at in positions:
        byte_at = len(text[:at].encode("utf-8"))
        i = bisect.bisect_right(starts, byte_at) - 1
        data, top = reply.tokens[i]
        p0, p1 = _binary(top, data[: byte_at - starts[i]].decode("utf-8", errors="replace"))
        out.append(round(p1 / (p0 + p1), 9) if p0 + p1 > 0 else None)
    return out


def read_labels(reply: ChatReply, n: int, logprobs: bool, opened: bool) -> dict:
    """The reply's list of n labels (after the prompt's "[" when `opened`, else the first "[...]" of
    the reply) with their probabilities, as a cacheable dict; {"bad": why, ...} when unreadable."""
    text = reply.text
    spent = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
    start = 0
    if not opened:
        start = text.find("[") + 1
        if start == 0:
            return {"bad": f"no [ in the reply {text[:60]!r}", **spent}
    end = text.find("]", start)
    body = text[start : len(text) if end < 0 else end]
    labels: list[int | None] = []
    positions: list[int] = []
    pos = start
    for item in body.split(","):
        value = item.strip()
        if value not in ("0", "1"):
            return {"bad": f"{value[:20]!r} is not a label 0 or 1 in {text[:60]!r}", **spent}
        labels.append(int(value))
        positions.append(pos + item.index(value))
        pos += len(item) + 1
    if len(labels) != n:
        return {"bad": f"{len(labels)} labels for {n} texts in {text[:60]!r}", **spent}
    probs = label_probabilities(reply, positions) if logprobs else None
    return {"labels": labels, "probabilities": probs, **spent}


class ServerClassifier(Classifier):
    """Labels from an OpenAI-compatible server; `top_logprobs=None` reads the written labels only."""

    def __init__(self, backend: OpenAIBackend, top_logprobs: int | None = LABEL_TOP_LOGPROBS):
        self.llm = backend
        self.backend, self.model = backend.backend, backend.model
        self.chat = backend.api == "chat"
        self.top_logprobs = top_logprobs
        self.prompt_version = CLASSIFY_CHAT_VERSION if self.chat else CLASSIFY_VERSION

    @property
    def usage(self) -> Usage:
        return self.llm.usage

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        # Room for "1, " per label (and, in chat, a little around the list).
        params = GenerationParams(
            max_tokens=4 * longest + (24 if self.chat else 4), temperature=0.0, top_p=1.0, n=1,
            stop=() if self.chat else ("]",), seed=0,
        )  # fmt: skip
        logprobs = self.top_logprobs is not None
        readers = [functools.partial(read_labels, n=len(p), logprobs=logprobs, opened=not self.chat) for p in prompts]
        if self.chat:
            asked = [classification_messages(scorer, explanation, p) for p in prompts]
            values = self.llm.chat_levels(asked, params, self.top_logprobs, readers, version=LABELS_READ)
        else:
            texts = [classification_prompt(scorer, explanation, p) for p in prompts]
            values = self.llm.completion_levels(texts, params, self.top_logprobs, readers, version=LABELS_READ)
        out: list[Answer | LLMFailure] = []
        for shown, value in zip(prompts, values, strict=True):
            if isinstance(value, LLMFailure):
                out.append(value)
            elif "bad" in value:
                out.append(Answer([None] * len(shown), None, value["prompt_tokens"], value["completion_tokens"],
                                  problem=f"unreadable answer: {value['bad']}"))  # fmt: skip
            else:
                out.append(Answer.from_record(value))
        return out


class CachedClassifier(Classifier):
    """Any classifier, with each answered prompt stored as soon as it is answered."""

    def __init__(self, inner: Classifier, cache: LLMCache):
        self.inner, self.cache = inner, cache
        self.backend, self.model, self.prompt_version = inner.backend, inner.model, inner.prompt_version

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        return self.classify_each(scorer, [explanation], prompts)[0]

    def classify_each(
        self, scorer: str, explanations: Sequence[str], prompts: Sequence[Sequence[Shown]]
    ) -> list[list[Answer | LLMFailure]]:
        params = {"prompt_version": self.prompt_version}
        keys = [[cache_prompt(scorer, e, p) for p in prompts] for e in explanations]
        out: list[list[Answer | LLMFailure | None]] = []
        for row in keys:
            hits = [self.cache.get(self.backend, self.model, "classify", k, params) for k in row]
            out.append([Answer.from_record(h, cached=True) if h is not None else None for h in hits])
        missing = sum(r is None for row in out for r in row)
        self.usage.add(cache_hits=len(explanations) * len(prompts) - missing)
        for i, prompt in enumerate(prompts):
            todo = [j for j in range(len(explanations)) if out[j][i] is None]
            if not todo:
                continue
            fresh = self.inner.classify_each(scorer, [explanations[j] for j in todo], [prompt])
            for j, answers in zip(todo, fresh, strict=True):
                result = answers[0]
                if isinstance(result, Answer) and result.problem is None:
                    self.cache.put(self.backend, self.model, "classify", keys[j][i], params, result.record())
                out[j][i] = result
        return [[r for r in row if r is not None] for row in out]

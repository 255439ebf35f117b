"""The small interface every explainer/simulator backend implements.

Failures are values, not exceptions: a backend returns an `LLMFailure` for the prompt that failed
(after its retries), so one bad neuron is recorded with its reason and the layer completes.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A chat prompt: system/user/assistant turns as {"role": ..., "content": ...}. A plain string is a
# completion-style prompt.
Messages = list[dict[str, str]]
Prompt = str | Messages
APIS = ("completions", "chat")


def role_env(role: str, name: str) -> str | None:
    """NEURON_ATLAS_<ROLE>_<NAME> (ROLE: EXPLAINER or SIMULATOR), else the shared NEURON_ATLAS_LLM_<NAME>
    that older setups set for both."""
    return os.environ.get(f"NEURON_ATLAS_{role}_{name}") or os.environ.get(f"NEURON_ATLAS_LLM_{name}") or None


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 60
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ("\n",)
    seed: int = 0
    # Texts the completion must not reproduce (no three consecutive tokens of any), e.g. the prompt's
    # few-shot explanations that a small model would otherwise copy. In-process backends only.
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    # Per text: generation ran into max_tokens before a stop sequence, so the line is cut off.
    # Empty when unknown (responses cached before this was recorded).
    truncated: tuple[bool, ...] = ()

    def record(self) -> dict[str, Any]:
        """What a response cache keeps of it: all but `cached`, as JSON-ready values."""
        return {
            "texts": self.texts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "truncated": list(self.truncated),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], cached: bool) -> Completion:
        """Back from `record()`; entries stored before `truncated` was kept read as unknown."""
        return cls(
            record["texts"], record["prompt_tokens"], record["completion_tokens"], cached,
            tuple(record.get("truncated", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class LLMFailure:
    """Why a request produced nothing usable (kept per neuron in the warehouse)."""

    reason: str
    attempts: int = 1


@dataclass(frozen=True)
class EchoLogprobs:
    """An echoed prompt: its tokens and, per position, the top log-probabilities of that position
    given everything before it (what `completions(echo=True, logprobs=k, max_tokens=0)` returns)."""

    tokens: list[str]
    top_logprobs: Sequence[dict[str, float]] = field(default_factory=list)
    # Character offset of each token in the prompt, when the server gives it: byte-level tokens
    # (e.g. "bytes:\\xe2\\x80") do not add up to the prompt's text, offsets always do.
    text_offset: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ChatReply:
    """A chat answer with, per generated token, its bytes and top log-probabilities (empty when
    logprobs were not asked for)."""

    text: str
    tokens: list[tuple[bytes, dict[str, float]]]
    truncated: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Unusable(Exception):
    """A reply that arrived but cannot be read (e.g. echoed logprobs without the needed positions):
    a failure of that request with this reason, neither retried nor cached."""


class Usage:
    """What a client spent, for the stages' metadata: requests sent (retries included), prompt and
    completion tokens the server reported, and answers taken from the response cache instead.
    Thread-safe; one object may be shared by a backend and the wrappers around it."""

    FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cache_hits")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.counts[name] += int(value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was spent after `before = usage.snapshot()`."""
        now = self.snapshot()
        return {name: now[name] - before.get(name, 0) for name in self.FIELDS}


class LLMBackend(ABC):
    """Text completion; `backend` and `model` name it in the warehouse's lineage columns.

    `api` says what prompts it takes: "completions" (a string, continued as text) or "chat" (a list
    of turns; a string is sent as one user turn)."""

    backend: str
    model: str
    api: str = "completions"
    batch_hint: int = 32  # prompts per `complete` call when progress should be visible between calls

    @property
    def usage(self) -> Usage:
        if "_usage" not in self.__dict__:
            self.__dict__["_usage"] = Usage()
        return self.__dict__["_usage"]

    @abstractmethod
    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        """One result per prompt, in order, each with `params.n` samples."""

    def complete_each(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        on_result: Callable[[int, Completion | LLMFailure], None] | None = None,
    ) -> list[Completion | LLMFailure]:
        """`complete` of every prompt, with `on_result(index, result)` as each one is known. This default
        asks `batch_hint` prompts per call; a server backend sends them all under its concurrency limit."""
        out: list[Completion | LLMFailure] = []
        step = max(1, self.batch_hint)
        for lo in range(0, len(prompts), step):
            for result in self.complete(prompts[lo : lo + step], params):
                if on_result is not None:
                    on_result(len(out), result)
                out.append(result)
        return out

    def echo_logprobs(self, prompts: Sequence[str], top_logprobs: int = 5) -> list[EchoLogprobs | LLMFailure]:
        """Each prompt's tokens with the top log-probabilities at every position, one result per prompt."""
        raise NotImplementedError(f"{type(self).__name__} cannot echo prompts with logprobs")

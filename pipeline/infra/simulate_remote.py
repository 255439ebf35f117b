"""Simulators over an OpenAI-compatible server: expected levels from echoed prompt logprobs, or from a
chat reply's logprobs.

`EchoSimulator` is the paper's "all at once" method over HTTP (completions with `echo` + `logprobs`:
vLLM, llama-cpp-python's server, OpenAI's legacy completion models): one echoed prompt per sequence,
each token's level read from the top logprobs at its `unknown` slot. Only the per-slot level
distributions are cached, not the echoed prompt.

`ChatSimulator` is for chat servers (OpenAI's chat models, llama.cpp, Ollama, OpenRouter): the
model writes the sequence back as one `token<TAB>level` line per token, and each token's value is
the expected level over the top logprobs at its level token. Without logprobs it takes the written
levels, under its own prompt version so the two are never mixed.

Where a tokenizer writes "10" as "1" + "0" (Gemma, Llama, Qwen), p("1") at a level position is
shared by 1 and 10. The echo simulator splits it exactly with one more request per affected slot
(the prompt up to the slot followed by "1": p("0") against the line end after it), skipped where
p("1") is below `branch_min_share` of the slot's level mass (so the error stays under
`9 * branch_min_share` levels). The chat simulator splits it with the next generated token's top
logprobs when the model wrote a "1" there; otherwise p("1") counts as 1.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import math
import operator
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from pipeline.core.llm import ChatReply, EchoLogprobs, GenerationParams, LLMFailure, Unusable, Usage
from pipeline.core.prompts import (
    SIMULATE_CHAT_SAMPLED_VERSION,
    SIMULATE_CHAT_VERSION,
    SIMULATE_VERSION,
    chat_simulation_messages,
    chat_simulation_retry,
    chat_token,
    simulation_pieces,
    simulation_prefix,
)
from pipeline.core.simulator import LEVELS, Job, JobResult, OnJob, Simulator, parse_level
from pipeline.infra.llm_openai import OpenAIBackend

MAX_TOP_LOGPROBS = 20  # what chat APIs allow (OpenAI, Ollama); vLLM's default --max-logprobs
ECHO_READ = "slot-levels-v1"  # what the echo cache entries hold: bump if the reduction changes
CHAT_READ = "line-levels-v1"
Distribution = list[float]  # unnormalised probability of each level 0..10


def _prompt_and_slots(prefix: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The simulation prompt and the character position where each slot's `unknown` begins."""
    parts, slots, pos = [prefix], [], len(prefix)
    for text, is_slot in simulation_pieces(tokens):
        if is_slot:
            slots.append(pos)
        parts.append(text)
        pos += len(text)
    return "".join(parts), slots


# A server's top candidates repeat the same few spellings at every slot: parse each once.
_level_of = functools.lru_cache(maxsize=1 << 16)(parse_level)


def _levels_of(top: dict[str, float], prefix: str = "") -> Distribution:
    """Probability of each level among top candidates (spellings like "3" and " 3" add up); with a
    prefix, only candidates that start with it count, read after it."""
    probs = [0.0] * len(LEVELS)
    cut = len(prefix)
    for token, logprob in top.items():
        if cut and not token.startswith(prefix):
            continue
        level = _level_of(token[cut:] if cut else token)
        if level is not None:
            probs[level] += math.exp(logprob)
    return probs


def expected(dist: Distribution) -> float | None:
    total = sum(dist)
    return sum(map(operator.mul, LEVELS, dist)) / total if total > 0 else None


def _split_ten(dist: Distribution, after_one: dict[str, float]) -> Distribution | None:
    """Share p("1") between 1 and 10 by what follows a written "1": "0" (10) or the line's end (1)."""
    zero = sum(math.exp(v) for t, v in after_one.items() if t[:1] == "0" and not t[1:].strip())
    end = sum(math.exp(v) for t, v in after_one.items() if not t.strip())
    if not zero + end > 0:
        return None
    out = list(dist)
    out[10] += dist[1] * zero / (zero + end)
    out[1] = dist[1] * end / (zero + end)
    return out


def slot_distributions(echo: EchoLogprobs, prompt: str, slots: Sequence[int]) -> list[Distribution]:
    """Each slot's level distribution from an echoed prompt's top logprobs (`Unusable` if unreadable)."""
    if len(echo.text_offset) == len(echo.tokens):
        starts = echo.text_offset
    else:  # no offsets from the server: the token strings must spell the prompt
        if "".join(echo.tokens) != prompt:
            raise Unusable("the echoed tokens do not spell the prompt and the server gave no text offsets")
        starts, pos = [], 0
        for tok in echo.tokens:
            starts.append(pos)
            pos += len(tok)
    if len(echo.top_logprobs) != len(echo.tokens):
        raise Unusable("the server returned no logprobs for some echoed tokens")
    out: list[Distribution] = []
    for k, slot in enumerate(slots):
        i = bisect.bisect_right(starts, slot) - 1
        # The slot's token may carry the tab before it ("\tunknown"); its candidates then do too ("\t3").
        before = prompt[starts[i] : slot] if i >= 0 else ""
        if i < 0 or before.strip():
            raise Unusable(f"slot {k} does not start a token of the echoed prompt")
        dist = _levels_of(echo.top_logprobs[i] or {}, before)
        if not sum(dist) > 0:
            raise Unusable(f"no 0-10 level among the top logprobs at token {i}")
        out.append([round(p, 9) if p else 0.0 for p in dist])
    return out


class _ServerSimulator(Simulator):
    """What the server simulators share: lineage and usage from their backend, and the sync entry
    points, each running `asimulate_each` on the backend's event loop."""

    def __init__(self, backend: OpenAIBackend):
        self.llm = backend
        self.backend, self.model = backend.backend, backend.model

    @property
    def usage(self) -> Usage:
        return self.llm.usage

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        return all_or_failure(self.simulate_each(explanation, sequences))

    def simulate_each(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray | LLMFailure]:
        return self.llm.run(lambda: self.asimulate_each(explanation, sequences))

    def simulate_many(self, jobs: Sequence[Job], on_result: OnJob | None = None) -> list[JobResult]:
        """Every job's requests at once, under the backend's one concurrency limit."""
        return self.llm.run(lambda: gather_jobs(self.asimulate_each, jobs, on_result))

    @abstractmethod
    async def asimulate_each(
        self, explanation: str, sequences: Sequence[Sequence[str]]
    ) -> list[np.ndarray | LLMFailure]:
        """Every sequence's levels or its own failure (an empty sequence: no request, no levels)."""


class EchoSimulator(_ServerSimulator):
    """Expected level per token from echoed prompt logprobs, one request per sequence (see the module doc)."""

    prompt_version = SIMULATE_VERSION

    def __init__(self, backend: OpenAIBackend, top_logprobs: int = 15, branch_min_share: float = 0.01):
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be at least 1, got {top_logprobs}")
        super().__init__(backend)
        self.top_logprobs = top_logprobs
        self.branch_min_share = branch_min_share

    async def asimulate_each(
        self, explanation: str, sequences: Sequence[Sequence[str]]
    ) -> list[np.ndarray | LLMFailure]:
        prefix = simulation_prefix(explanation)
        built = [_prompt_and_slots(prefix, seq) for seq in sequences]
        asked = [j for j, seq in enumerate(sequences) if len(seq)]  # an empty sequence needs no request
        replies = await self.llm.aecho_levels(
            [built[j][0] for j in asked],
            self.top_logprobs,
            # Partials of module functions, not lambdas: the backend's client processes can run them.
            [functools.partial(slot_distributions, slots=built[j][1]) for j in asked],
            version=ECHO_READ,
        )
        out: list[np.ndarray | LLMFailure] = [np.zeros(0, dtype=np.float64) for _ in sequences]
        dists: dict[int, list[Distribution]] = {}
        for j, reply in zip(asked, replies, strict=True):
            if isinstance(reply, LLMFailure):
                out[j] = reply
            else:
                dists[j] = [list(d) for d in reply]
        # "10" written as "1" + "0": what follows a "1" at each slot where p("1") matters.
        branches = [
            (j, k)
            for j, ds in dists.items()
            for k, d in enumerate(ds)
            if d[1] > 0 and d[10] == 0 and d[1] >= self.branch_min_share * sum(d)
        ]
        if branches:
            prompts = [built[j][0][: built[j][1][k]] + "1" for j, k in branches]
            afters = await self.llm.anext_logprobs(prompts, self.top_logprobs)
            for (j, k), after in zip(branches, afters, strict=True):
                if isinstance(after, LLMFailure):
                    out[j] = LLMFailure(f"reading 10 at token {k}: {after.reason}", after.attempts)
                elif (split := _split_ten(dists[j][k], after)) is not None:
                    dists[j][k] = split
        for j, ds in dists.items():
            if not isinstance(out[j], LLMFailure):
                out[j] = np.array([expected(d) for d in ds], dtype=np.float64)
        return out


async def gather_jobs(
    simulate: Callable[[str, Sequence[Sequence[str]]], Awaitable[list[np.ndarray | LLMFailure]]],
    jobs: Sequence[Job],
    on_result: OnJob | None,
) -> list[JobResult]:
    """Every job at once (each a chain of requests: echo, then its "10" splits; or ask, then re-ask),
    each reported as soon as its own chain ends."""

    async def one(i: int, job: Job) -> JobResult:
        result = await simulate(job.explanation, job.sequences)
        if on_result is not None:
            on_result(i, result)
        return result

    return list(await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs))))


def all_or_failure(results: list[np.ndarray | LLMFailure]) -> list[np.ndarray] | LLMFailure:
    """Every sequence's levels, or the first failure (for callers that need all of them)."""
    for j, r in enumerate(results):
        if isinstance(r, LLMFailure):
            return LLMFailure(f"sequence {j}: {r.reason}", r.attempts)
    return [r for r in results if not isinstance(r, LLMFailure)]


def _byte_starts(reply: ChatReply) -> list[int]:
    starts, pos = [], 0
    for data, _ in reply.tokens:
        starts.append(pos)
        pos += len(data)
    return starts


def _same_token(written: str, token: str) -> bool:
    """A line's token as written, quoted as asked (JSON) or bare; spaces around it do not count."""
    text = written.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            text = str(json.loads(text))
        except json.JSONDecodeError:
            text = text[1:-1]
    return text.strip() == token.strip()


def read_chat_levels(reply: ChatReply, tokens: Sequence[str], logprobs: bool) -> dict:
    """The reply's lines aligned one by one with the tokens, as {"levels": [distribution per token]},
    or {"bad": why, "text": reply} when they do not align (a wrong count, a line for another token,
    no level): never shifted to fit."""
    text = reply.text
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1

    def bad(why: str) -> dict:
        return {"bad": why, "text": text}

    if len(lines) - first < len(tokens):
        return bad(f"{len(lines) - first} lines for {len(tokens)} tokens")
    lines = lines[: first + len(tokens)]  # lines after one per token (a model running on) are not read
    # Some servers list the stop sequence's tokens too (after the text they cut there): ignore those.
    if logprobs and not b"".join(d for d, _ in reply.tokens).startswith(text.encode("utf-8")):
        raise Unusable("the reply's logprob tokens do not spell its text")
    starts = _byte_starts(reply) if logprobs else []
    out: list[Distribution] = []
    pos = sum(len(line) + 1 for line in lines[:first])
    for k, (line, token) in enumerate(zip(lines[first:], tokens, strict=True)):
        written, tab, level_text = line.rpartition("\t")
        expected_text = chat_token(token)
        if not tab:
            return bad(f"line {k + 1} has no tab: {line[:40]!r}")
        if not _same_token(written, token):
            return bad(f"line {k + 1} is for {written.strip()[:40]}, not the token {expected_text[:40]}")
        level = parse_level(level_text)
        if level is None:
            return bad(f"line {k + 1} gives {level_text[:20]!r}, not a level from 0 to 10")
        if not logprobs:
            out.append([1.0 if v == level else 0.0 for v in LEVELS])
            pos += len(line) + 1
            continue
        at = pos + len(written) + 1 + (len(level_text) - len(level_text.lstrip()))
        byte_at = len(text[:at].encode("utf-8"))
        i = bisect.bisect_right(starts, byte_at) - 1
        data, top = reply.tokens[i]
        before = data[: byte_at - starts[i]].decode("utf-8", errors="replace")
        dist = _levels_of(top, before)
        if not sum(dist) > 0:
            return bad(f"no 0-10 level among the top logprobs of line {k + 1}")
        # The model wrote a "1" token here: the next token's odds split p("1") between 1 and 10.
        written_piece = data[byte_at - starts[i] :].decode("utf-8", errors="replace")
        if dist[10] == 0 and dist[1] > 0 and written_piece == "1" and i + 1 < len(reply.tokens):
            dist = _split_ten(dist, reply.tokens[i + 1][1]) or dist
        out.append([round(p, 9) if p else 0.0 for p in dist])
        pos += len(line) + 1
    return {"levels": out}


class ChatSimulator(_ServerSimulator):
    """Expected levels from a chat reply that writes the sequence back with levels (see the module doc);
    `top_logprobs=None` reads the written levels for servers without logprobs."""

    def __init__(self, backend: OpenAIBackend, top_logprobs: int | None = 15, max_tokens_per_token: int = 12):
        if top_logprobs is not None and not 1 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 1 and {MAX_TOP_LOGPROBS} for chat, got {top_logprobs}")
        super().__init__(backend)
        self.top_logprobs = top_logprobs
        self.max_tokens_per_token = max_tokens_per_token
        self.prompt_version = SIMULATE_CHAT_VERSION if top_logprobs is not None else SIMULATE_CHAT_SAMPLED_VERSION

    async def _ask(self, conversations: list[list[dict]], tokens: list[Sequence[str]]) -> list[dict | LLMFailure]:
        # Room for each line (token, tab, level, line end) plus a little chatter.
        longest = max(len(t) for t in tokens)
        params = GenerationParams(
            max_tokens=self.max_tokens_per_token * longest + 32, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0
        )
        logprobs = self.top_logprobs is not None
        readers = [functools.partial(read_chat_levels, tokens=toks, logprobs=logprobs) for toks in tokens]
        return await self.llm.achat_levels(conversations, params, self.top_logprobs, readers, version=CHAT_READ)

    async def asimulate_each(
        self, explanation: str, sequences: Sequence[Sequence[str]]
    ) -> list[np.ndarray | LLMFailure]:
        out: list[np.ndarray | LLMFailure] = [np.zeros(0, dtype=np.float64) for _ in sequences]
        asked = [j for j, seq in enumerate(sequences) if len(seq)]
        if not asked:
            return out
        conversations = {j: chat_simulation_messages(explanation, sequences[j]) for j in asked}
        first = await self._ask([conversations[j] for j in asked], [sequences[j] for j in asked])
        retry: list[int] = []
        results: dict[int, dict | LLMFailure] = dict(zip(asked, first, strict=True))
        for j in asked:
            value = results[j]
            if isinstance(value, dict) and "bad" in value:
                retry.append(j)
        if retry:  # one more ask, showing the model its reply and what is wrong with it
            again = [
                chat_simulation_retry(conversations[j], results[j]["text"], results[j]["bad"], len(sequences[j]))  # type: ignore[index]
                for j in retry
            ]
            for j, value in zip(retry, await self._ask(again, [sequences[j] for j in retry]), strict=True):
                results[j] = value
        for j in asked:
            value = results[j]
            if isinstance(value, LLMFailure):
                out[j] = value
            elif "bad" in value:
                out[j] = LLMFailure(f"the reply does not match the tokens: {value['bad']}")
            else:
                out[j] = np.array([expected(d) for d in value["levels"]], dtype=np.float64)
        return out

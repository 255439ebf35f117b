"""Simulators over a remote `LLMBackend`: exact-ish level odds from echoed logprobs, or a JSON fallback.

`EchoSimulator` is the paper's "all at once" method over HTTP: one echoed prompt per sequence, the
level read from the top logprobs at each `unknown` slot. It needs a completions server that echoes
the prompt with logprobs (OpenAI's legacy completions models, vLLM). `JsonSimulator` is the
fallback for servers that cannot (chat-only models): it asks for the levels as a JSON list, so it
yields a single sampled level per token rather than an expected value.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence

import numpy as np

from pipeline.llm import EchoLogprobs, GenerationParams, LLMBackend, LLMFailure
from pipeline.prompts import EXPLANATION_ENDING, SIMULATE_VERSION, simulation_pieces, simulation_prefix
from pipeline.simulator import LEVELS, Simulator, expected_level, parse_level

JSON_SIMULATE_VERSION = "simulate-json-v1"


def _prompt_and_slots(prefix: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The simulation prompt and the character position where each slot's `unknown` begins."""
    parts, slots, pos = [prefix], [], len(prefix)
    for text, is_slot in simulation_pieces(tokens):
        if is_slot:
            slots.append(pos)
        parts.append(text)
        pos += len(text)
    return "".join(parts), slots


def read_slot_levels(echo: EchoLogprobs, prompt: str, slots: Sequence[int]) -> np.ndarray | str:
    """Expected level at each slot from an echoed prompt's top logprobs, or the reason it cannot be read."""
    if len(echo.text_offset) == len(echo.tokens):
        starts = list(echo.text_offset)
    else:  # no offsets from the server: the token strings must spell the prompt
        if "".join(echo.tokens) != prompt:
            return "the echoed tokens do not spell the prompt and the server gave no text offsets"
        starts, pos = [], 0
        for tok in echo.tokens:
            starts.append(pos)
            pos += len(tok)
    if len(echo.top_logprobs) != len(echo.tokens):
        return "the server returned no logprobs for some echoed tokens"
    levels = np.empty(len(slots), dtype=np.float64)
    for k, slot in enumerate(slots):
        i = bisect.bisect_right(starts, slot) - 1
        # The slot's token may carry the tab before it ("\tunknown"); its candidates then do too ("\t3").
        if i < 0 or prompt[starts[i] : slot].strip():
            return f"slot {k} does not start a token of the echoed prompt"
        probs: dict[int, float] = {}
        for tok, logprob in (echo.top_logprobs[i] or {}).items():
            level = parse_level(tok)
            if level is not None:
                probs[level] = probs.get(level, 0.0) + math.exp(logprob)
        value = expected_level(probs)
        if value is None:
            return f"no 0-10 level among the top logprobs at token {i}"
        levels[k] = value
    return levels


class EchoSimulator(Simulator):
    """Expected level per token from `echo_logprobs` of the simulation prompt, one request per sequence.

    Tokens that spell the same level ("3", " 3") have their probabilities summed, and only the
    levels among the top `top_logprobs` count (renormalised among themselves). With echo a level is
    read from a single token, so "10" is exact only where the tokenizer writes it as one token (as
    OpenAI's do); where it is "1" + "0", p("1") is counted as 1. Multi-token numerals are handled
    exactly by the local simulator (`pipeline.simulate_local`).
    """

    prompt_version = SIMULATE_VERSION

    def __init__(self, backend: LLMBackend, top_logprobs: int = 5):
        self.llm = backend
        self.backend, self.model = backend.backend, backend.model
        self.top_logprobs = top_logprobs

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        prefix = simulation_prefix(explanation)
        built = [_prompt_and_slots(prefix, seq) for seq in sequences]
        asked = [j for j, seq in enumerate(sequences) if len(seq)]  # an empty sequence needs no request
        replies = self.llm.echo_logprobs([built[j][0] for j in asked], top_logprobs=self.top_logprobs)
        out = [np.zeros(0, dtype=np.float64) for _ in sequences]
        for j, reply in zip(asked, replies, strict=True):
            if isinstance(reply, LLMFailure):
                return LLMFailure(f"sequence {j}: {reply.reason}", reply.attempts)
            levels = read_slot_levels(reply, *built[j])
            if isinstance(levels, str):
                return LLMFailure(f"sequence {j}: {levels}")
            out[j] = levels
        return out


def json_simulation_prompt(explanation: str, tokens: Sequence[str]) -> str:
    """Asks for one 0-10 integer per token as a JSON list; the tokens are given as a JSON list too."""
    return (
        "We are studying a neuron in a language model. A neuron reads a text one token at a time and responds to "
        "some of the tokens with a whole number from 0 (not at all) to 10 (its strongest response).\n"
        f"Explanation of the neuron's behavior: {EXPLANATION_ENDING} {explanation}.\n"
        f"Tokens of the text, as a JSON list: {json.dumps(list(tokens), ensure_ascii=False)}\n"
        f"Predict the neuron's response to each token from the explanation. Reply with only a JSON list of "
        f"{len(tokens)} integers from 0 to 10, one per token, in order.\n"
        "Levels: "
    )


def parse_json_levels(text: str, n: int) -> np.ndarray | str:
    """The first JSON list in a reply as n levels in 0..10, or why it is not that."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            break
    else:
        return "no JSON list in the reply"
    if len(value) != n:
        return f"the reply lists {len(value)} values for {n} tokens"
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f"value {k} of the reply is not a number: {json.dumps(v)[:40]}"
        if not LEVELS[0] <= v <= LEVELS[-1]:
            return f"value {k} of the reply is {v}, outside 0..10"
    return np.asarray(value, dtype=np.float64)


class JsonSimulator(Simulator):
    """Levels from a JSON list the model writes (greedy): the fallback for servers without echo+logprobs.

    One sampled level per token is a coarser score than an expected value, so results carry their
    own prompt version and are not mixed with echo/local ones.
    """

    prompt_version = JSON_SIMULATE_VERSION

    def __init__(self, backend: LLMBackend):
        self.llm = backend
        self.backend, self.model = backend.backend, backend.model

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        asked = [j for j, seq in enumerate(sequences) if len(seq)]
        out = [np.zeros(0, dtype=np.float64) for _ in sequences]
        if not asked:
            return out
        longest = max(len(sequences[j]) for j in asked)
        # Up to ~3 tokens per value (", 10") plus room for brackets and a little chatter.
        params = GenerationParams(max_tokens=4 * longest + 32, temperature=0.0, top_p=1.0, n=1, stop=(), seed=0)
        prompts = [json_simulation_prompt(explanation, sequences[j]) for j in asked]
        replies = self.llm.complete(prompts, params)
        for j, reply in zip(asked, replies, strict=True):
            if isinstance(reply, LLMFailure):
                return LLMFailure(f"sequence {j}: {reply.reason}", reply.attempts)
            levels = parse_json_levels(reply.texts[0] if reply.texts else "", len(sequences[j]))
            if isinstance(levels, str):
                return LLMFailure(f"sequence {j}: {levels}")
            out[j] = levels
        return out

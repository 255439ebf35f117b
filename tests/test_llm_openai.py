"""The OpenAI-compatible backend and the remote simulators against a real HTTP server on loopback.

The server (tests/loopback_llm.py) scripts faults per prompt, so retries, give-ups, concurrency,
caching and key hygiene are observed on the wire rather than mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loopback_llm import LoopbackServer, ServerState, bypass_proxies, simple_tokens

from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import Completion, EchoLogprobs, GenerationParams, LLMFailure
from pipeline.core.prompts import (
    SIMULATE_CHAT_SAMPLED_VERSION,
    SIMULATE_CHAT_VERSION,
    SIMULATE_VERSION,
    simulation_prompt,
)
from pipeline.infra.llm_cache import LLMCache, cache_key
from pipeline.infra.llm_openai import (
    NO_CHAT_LOGPROBS,
    NO_LOGPROBS,
    OpenAIBackend,
    _parse_echo,
    read_json,
    retry_after_seconds,
)
from pipeline.infra.simulate_remote import ChatSimulator, EchoSimulator

KEY = "sk-test-PLANTED-123"
KEY_ENV = "NEURON_ATLAS_TEST_LLM_KEY"
PARAMS = GenerationParams(max_tokens=8, temperature=0.0, stop=("\n",))


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    bypass_proxies(monkeypatch)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(ServerState()) as srv:
        yield srv


def backend(server: LoopbackServer, **kw: Any) -> OpenAIBackend:
    options: dict[str, Any] = {
        "api_key_env": KEY_ENV,
        "max_concurrency": 4,
        "timeout_s": 1.5,  # generous: a loaded CI machine must not turn slow replies into retries
        "max_attempts": 7,
        "backoff_base_s": 0.001,
        "backoff_cap_s": 0.01,
    }
    return OpenAIBackend("test-model", server.base_url, **(options | kw))


def test_retries_each_fault_then_succeeds(server: LoopbackServer) -> None:
    state = server.state
    state.plan = {"FLAKY": ["500", "malformed", "empty", "slow", "reset", "truncated"], "LIMITED": ["429"]}
    state.retry_after = "1"
    state.replies = [("FLAKY", "flaky done\n"), ("LIMITED", "limited do")]  # the second runs into max_tokens
    start = time.monotonic()
    flaky, limited = backend(server, retry_timeouts=True).complete(["FLAKY prompt", "LIMITED prompt"], PARAMS)
    elapsed = time.monotonic() - start
    assert flaky == Completion(["flaky done\n"], prompt_tokens=3, completion_tokens=1, truncated=(False,))
    assert limited == Completion(["limited do"], prompt_tokens=3, completion_tokens=1, truncated=(True,))
    assert state.requests == 7 + 2
    assert elapsed >= 0.9, "Retry-After: 1 was honoured (the jittered backoff alone is milliseconds)"
    body = state.bodies[-1]
    assert (body["model"], body["max_tokens"], body["temperature"], body["stop"]) == ("test-model", 8, 0.0, ["\n"])


def test_gives_up_after_max_attempts_and_the_rest_succeed(server: LoopbackServer) -> None:
    server.state.plan = {"DOOMED": ["500"] * 10, "TIMEOUT": ["slow"] * 10, "REFUSED": ["401"] * 10}
    prompts = ["ok A", "DOOMED", "ok B", "TIMEOUT", "REFUSED", "ok C"]
    results = backend(server, max_attempts=3).complete(prompts, PARAMS)
    ok = [results[i] for i in (0, 2, 5)]
    assert all(isinstance(r, Completion) for r in ok)
    assert [r.texts for r in ok if isinstance(r, Completion)] == [
        ["reply to ok A"],
        ["reply to ok B"],
        ["reply to ok C"],
    ]
    doomed, timeout, refused = results[1], results[3], results[4]
    assert isinstance(doomed, LLMFailure) and doomed.attempts == 3
    assert doomed.reason.startswith("HTTP 500") and "gave up after 3 attempts" in doomed.reason
    # A timed-out request is not resent into a server that may still be working on it.
    assert isinstance(timeout, LLMFailure) and timeout.attempts == 1 and "timed out" in timeout.reason
    assert "not resent" in timeout.reason
    # A 4xx other than 429 is not retried.
    assert isinstance(refused, LLMFailure) and refused.attempts == 1 and refused.reason.startswith("HTTP 401")
    assert server.state.requests == 3 + 3 + 1 + 1
    assert server.state.plan["DOOMED"] == ["500"] * 7


def test_concurrency_never_exceeds_the_limit(server: LoopbackServer) -> None:
    server.state.delay_s = 0.05
    results = backend(server, max_concurrency=3).complete([f"prompt {i}" for i in range(16)], PARAMS)
    assert [r.texts[0] for r in results if isinstance(r, Completion)] == [f"reply to prompt {i}" for i in range(16)]
    assert server.state.requests == 16
    assert server.state.max_in_flight == 3


def test_cache_prevents_repeat_requests(server: LoopbackServer, tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    server.state.plan = {"DOOMED": ["500"] * 100}
    prompts = ["first", "second", "DOOMED"]
    first = backend(server, cache=LLMCache(path), max_attempts=2).complete(prompts, PARAMS)
    assert server.state.requests == 2 + 2
    assert [type(r) for r in first] == [Completion, Completion, LLMFailure]
    assert not any(r.cached for r in first if isinstance(r, Completion))

    again = backend(server, cache=LLMCache(path), max_attempts=2).complete(prompts[:2], PARAMS)  # new instance
    assert server.state.requests == 4, "answered from the cache file, no HTTP request"
    assert again == [
        Completion(r.texts, r.prompt_tokens, r.completion_tokens, cached=True, truncated=r.truncated) for r in first[:2]
    ]

    fresh = backend(server, cache=LLMCache(path), max_attempts=2)
    fresh.complete(prompts, GenerationParams(max_tokens=8, temperature=0.0, seed=1))  # other params: a new key
    assert server.state.requests == 4 + 2 + 2, "failures are not cached; other params miss"
    other_model = OpenAIBackend("other-model", server.base_url, api_key_env=KEY_ENV, cache=LLMCache(path))
    other_model.complete(["first"], PARAMS)
    assert server.state.requests == 9
    assert len(LLMCache(path)) == 5
    assert cache_key("a", "m", "completion", "p", {"x": 1}) != cache_key("a", "m", "echo", "p", {"x": 1})


def test_api_key_is_sent_but_never_stored_or_shown(
    server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.state.plan = {"REFUSED": ["401"], "FLAKY": ["500", "429"]}
    server.state.retry_after = "0"
    llm = backend(server, cache=LLMCache(tmp_path / "cache.sqlite"))
    results = llm.complete(["REFUSED", "FLAKY", "fine"], PARAMS)
    results += llm.echo_logprobs(["echo\tunknown\n"])
    llm.complete(["fine"], PARAMS)

    assert set(server.state.auth_headers) == {f"Bearer {KEY}"}
    refused = results[0]
    assert isinstance(refused, LLMFailure) and "<api key>" in refused.reason, "the server quoted the key back"
    assert all(isinstance(r, Completion | EchoLogprobs) for r in results[1:])
    files = list(tmp_path.iterdir())
    assert files and all(KEY.encode() not in f.read_bytes() for f in files)
    assert KEY not in refused.reason
    assert KEY not in repr(llm) and KEY not in str(vars(llm))
    assert "retrying" in caplog.text and KEY not in caplog.text


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("offsets, echo_max_tokens", [(True, 0), (True, 1), (False, 1), (False, 0)])
def test_echo_logprobs(server: LoopbackServer, offsets: bool, echo_max_tokens: int) -> None:
    server.state.echo_offsets = offsets
    server.state.slot_probs = [{"3": 0.5, " 3": 0.25, "x": 0.125, "y": 0.0625}]
    prompt = "Neuron\nThe\tunknown\n<end>\n"
    (echo,) = backend(server, echo_max_tokens=echo_max_tokens).echo_logprobs([prompt], top_logprobs=3)
    assert isinstance(echo, EchoLogprobs)
    assert echo.tokens == simple_tokens(prompt), "a generated token (max_tokens=1) is trimmed"
    starts = [sum(len(t) for t in echo.tokens[:i]) for i in range(len(echo.tokens))]
    assert echo.text_offset == (starts if offsets else [])
    assert echo.top_logprobs[0] == {}, "null for the first token"
    slot = echo.tokens.index("unknown")
    assert echo.top_logprobs[slot] == pytest.approx({"3": math.log(0.5), " 3": math.log(0.25), "x": math.log(0.125)})
    body = server.state.bodies[-1]
    assert (body["echo"], body["logprobs"], body["max_tokens"]) == (True, 3, echo_max_tokens)


def test_echo_without_logprobs_is_a_failure(server: LoopbackServer) -> None:
    server.state.echo_logprobs = False
    (result,) = backend(server).echo_logprobs(["a\tunknown\n"])
    assert result == LLMFailure(NO_LOGPROBS, attempts=1)
    assert server.state.requests == 1


@pytest.mark.parametrize("offsets, echo_max_tokens", [(True, 0), (False, 1)])
def test_echo_simulator_expected_levels(server: LoopbackServer, offsets: bool, echo_max_tokens: int) -> None:
    server.state.echo_offsets = offsets
    # Per slot in order, cycling: "3" and " 3" add up; "unknown", "\n" and "x" are no level.
    server.state.slot_probs = [
        {"3": 0.4, " 3": 0.1, "7": 0.2, "unknown": 0.2, "\n": 0.1},
        {"10": 0.5, "0": 0.25, "x": 0.25},
    ]
    a = (3 * 0.5 + 7 * 0.2) / 0.7  # by hand: E[level] over the levels among the top logprobs
    b = (10 * 0.5 + 0 * 0.25) / 0.75
    sim = EchoSimulator(backend(server, echo_max_tokens=echo_max_tokens), top_logprobs=5)
    assert (sim.backend, sim.model, sim.prompt_version) == ("openai", "test-model", SIMULATE_VERSION)
    sequences = [["The", " cat", "\tsat"], [], ["Hi"]]
    out = sim.simulate("cats", sequences)
    assert not isinstance(out, LLMFailure)
    assert [o.tolist() for o in out] == [pytest.approx([a, b, a]), [], pytest.approx([a])]
    assert server.state.requests == 2, "no request for an empty sequence"
    prompts = sorted(body["prompt"] for body in server.state.bodies)  # requests run concurrently
    assert prompts == sorted(simulation_prompt("cats", seq) for seq in sequences if seq)


def test_echo_simulator_failures_are_per_sequence(server: LoopbackServer) -> None:
    server.state.slot_probs = [{"unknown": 0.6, "3": 0.3, "cat": 0.1}]
    sim = EchoSimulator(backend(server), top_logprobs=1)  # only "unknown" survives the top-1 cut
    (out,) = sim.simulate_each("cats", [["a", "b"]])
    assert isinstance(out, LLMFailure) and out.reason.startswith("no 0-10 level among the top logprobs")
    assert sim.simulate("cats", [["a", "b"]]) == LLMFailure(f"sequence 0: {out.reason}")

    server.state.echo_logprobs = False
    out = EchoSimulator(backend(server)).simulate_each("cats", [["a"], ["b"]])
    assert all(isinstance(o, LLMFailure) and NO_LOGPROBS in o.reason for o in out)


def test_echo_simulator_splits_ten_exactly_where_the_tokenizer_writes_1_0(server: LoopbackServer) -> None:
    """p("1") at a slot is shared by 1 and 10 when "10" is two tokens: one more request (the prompt up to
    the slot, then "1") reads p("0") against the line end, and splits it."""
    server.state.slot_probs = [{"1": 0.6, "3": 0.4}, {"1": 0.001, "2": 0.999}]
    server.state.next_probs = {"0": 0.6, "\n": 0.2, "x": 0.2}  # after "1": 10 three times as likely as 1
    sim = EchoSimulator(backend(server, max_concurrency=1), top_logprobs=5, branch_min_share=0.01)
    (levels,) = sim.simulate_each("cats", [["a", "b"]])
    split = 0.6 * 0.25 * 1 + 0.6 * 0.75 * 10 + 0.4 * 3  # by hand
    # The second slot's p("1") is under 1% of its level mass: counted as 1, no request.
    assert levels.tolist() == pytest.approx([split, (0.001 * 1 + 0.999 * 2) / 1.0])
    branch = [b for b in server.state.bodies if not b.get("echo")]
    assert len(branch) == 1 and branch[0]["max_tokens"] == 1 and branch[0]["logprobs"] == 5
    echo_prompt = next(b["prompt"] for b in server.state.bodies if b.get("echo"))
    assert branch[0]["prompt"] == echo_prompt[: echo_prompt.index("\tunknown") + 1] + "1"

    # Negative control: with the split turned off (threshold above every share), p("1") counts as 1.
    plain = EchoSimulator(backend(server), top_logprobs=5, branch_min_share=1.1).simulate_each("cats", [["a", "b"]])
    assert plain[0][0] == pytest.approx(0.6 * 1 + 0.4 * 3) and plain[0][0] != pytest.approx(split)


def test_echo_cache_keeps_slot_levels_not_the_echoed_prompt(server: LoopbackServer, tmp_path: Path) -> None:
    server.state.slot_probs = [{"3": 0.5, "7": 0.5}]
    cache = LLMCache(tmp_path / "cache.sqlite")
    tokens = [f"word{i}" for i in range(40)]
    first = EchoSimulator(backend(server, cache=cache)).simulate_each("cats", [tokens])
    again = EchoSimulator(backend(server, cache=LLMCache(cache.path))).simulate_each("cats", [tokens])
    assert server.state.requests == 1, "the second simulator read the cache"
    assert first[0].tolist() == again[0].tolist() == [5.0] * 40
    with sqlite3.connect(cache.path) as conn:
        ((kind, value),) = conn.execute("select kind, value from responses").fetchall()
    assert kind.startswith("echo:") and json.loads(value) == [[0.0] * 3 + [0.5] + [0.0] * 3 + [0.5] + [0.0] * 3] * 40
    assert "word1" not in value and "unknown" not in value


CHAT_TOKENS = ["The", " cat", " sat"]


def chat_reply(levels: list[str], tokens: list[str] = CHAT_TOKENS) -> str:
    return "".join(f'"{t}"\t{v}\n' for t, v in zip(tokens, levels, strict=True))


def test_chat_simulator_expected_levels_from_top_logprobs(server: LoopbackServer) -> None:
    state = server.state
    state.split_digits = True  # "10" is "1" + "0", as in Gemma's and Qwen's tokenizers
    state.queued = [chat_reply(["0", "10", "1"])]
    state.level_probs = [{"0": 0.5, "2": 0.25, "x": 0.25}, {"1": 0.8, "7": 0.2}, {"1": 0.6, "3": 0.4}]
    state.after_one = {"0": 0.75, "\n": 0.25}
    sim = ChatSimulator(backend(server, api="chat"), top_logprobs=7)
    assert (sim.backend, sim.model, sim.prompt_version) == ("openai", "test-model", SIMULATE_CHAT_VERSION)
    (levels,) = sim.simulate_each("cats", [CHAT_TOKENS])
    by_hand = [
        (0 * 0.5 + 2 * 0.25) / 0.75,
        0.8 * 0.75 * 10 + 0.8 * 0.25 * 1 + 0.2 * 7,  # a written "1": the next token splits p("1")
        0.6 * 0.75 * 10 + 0.6 * 0.25 * 1 + 0.4 * 3,
    ]
    assert levels.tolist() == pytest.approx(by_hand)
    body = state.bodies[-1]
    assert (body["logprobs"], body["top_logprobs"], body["temperature"]) == (True, 7, 0)
    assert body["messages"][0]["role"] == "system" and body["messages"][-1]["content"].endswith(
        '"The"\n" cat"\n" sat"\n'
    )
    assert [m["role"] for m in body["messages"][1:3]] == ["user", "assistant"]


def test_chat_simulator_reasks_once_then_fails_the_sequence_alone(server: LoopbackServer) -> None:
    state = server.state
    state.level_probs = [{"4": 1.0}]
    state.queued = [  # in request order (one in flight): both sequences, then both re-asks
        '"The"\t4\n" cat"\t4\n',  # sequence 0: two lines for three tokens
        '"P"\t4\n"X"\t4\n',  # sequence 1: a line for another token
        chat_reply(["4", "4", "4"]),  # sequence 0, asked again: right
        '"P"\t4\n"X"\t4\n',  # sequence 1, asked again: still wrong
    ]
    sim = ChatSimulator(backend(server, api="chat", max_concurrency=1), top_logprobs=5)
    out = sim.simulate_each("cats", [CHAT_TOKENS, ["P", "Q"]])
    assert not isinstance(out[0], LLMFailure) and out[0].tolist() == [4.0, 4.0, 4.0]
    assert out[1] == LLMFailure('the reply does not match the tokens: line 2 is for "X", not the token "Q"')
    assert state.requests == 4, "each sequence asked once, then once more"
    first, retry = state.bodies[0]["messages"], state.bodies[2]["messages"]
    assert retry[: len(first)] == first and retry[-2] == {"role": "assistant", "content": '"The"\t4\n" cat"\t4\n'}
    assert "(3 lines for 2 tokens)" not in retry[-1]["content"] and "(2 lines for 3 tokens)" in retry[-1]["content"]


def test_chat_simulator_without_logprobs_takes_the_written_levels(server: LoopbackServer) -> None:
    server.state.queued = [chat_reply(["0", "10", "3"])]
    sim = ChatSimulator(backend(server, api="chat"), top_logprobs=None)
    assert sim.prompt_version == SIMULATE_CHAT_SAMPLED_VERSION != SIMULATE_CHAT_VERSION
    (levels,) = sim.simulate_each("cats", [CHAT_TOKENS])
    assert levels.tolist() == [0.0, 10.0, 3.0]
    assert "logprobs" not in server.state.bodies[-1]


def test_chat_simulator_on_a_server_without_logprobs_says_what_to_set(server: LoopbackServer) -> None:
    server.state.chat_logprobs = False
    server.state.queued = [chat_reply(["0", "1", "3"])]
    (out,) = ChatSimulator(backend(server, api="chat")).simulate_each("cats", [CHAT_TOKENS])
    assert isinstance(out, LLMFailure) and out.reason == NO_CHAT_LOGPROBS and "logprobs: false" in out.reason


def test_usage_counts_requests_tokens_and_cache_hits(server: LoopbackServer, tmp_path: Path) -> None:
    server.state.plan = {"FLAKY": ["500"]}
    llm = backend(server, cache=LLMCache(tmp_path / "cache.sqlite"))
    llm.complete(["FLAKY one two", "three"], PARAMS)
    llm.complete(["FLAKY one two", "three"], PARAMS)
    assert llm.usage.snapshot() == {
        "requests": 3,  # one retry
        "prompt_tokens": 5 + 1,  # what the server reported
        "completion_tokens": 2,
        "cache_hits": 2,
    }


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_a_server_that_ignores_n_is_asked_once_per_sample(server: LoopbackServer, api: str) -> None:
    """llama.cpp's server answers n=3 with one choice: the backend then asks for each sample alone,
    with its own seed, instead of failing every explainer request as malformed."""
    server.state.ignore_n = True
    server.state.queued = ["a", "b", "c", "d", "e", "f"]
    llm = backend(server, api=api, max_concurrency=1)
    params = dataclasses.replace(PARAMS, n=3, seed=7)
    first, second = llm.complete(["one", "two"], params)
    assert isinstance(first, Completion) and first.texts == ["a", "b", "c"]
    assert isinstance(second, Completion) and second.texts == ["d", "e", "f"]
    assert first.completion_tokens == 3
    # The first request asked for n=3; once that came back with one choice, only n=1 was asked.
    assert [(b.get("n"), b.get("seed")) for b in server.state.bodies] == [
        (3, 7), (1, 8), (1, 9), (1, 7), (1, 8), (1, 9)
    ]  # fmt: skip


def test_complete_from_inside_a_running_event_loop(server: LoopbackServer) -> None:
    """A caller that already runs asyncio (a notebook, an async op) still gets plain results."""

    async def caller() -> list[Completion | LLMFailure]:
        return backend(server).complete(["inside"], PARAMS)

    assert asyncio.run(caller()) == [
        Completion(["reply to inside"], prompt_tokens=1, completion_tokens=1, truncated=(True,))
    ]


def test_cache_is_shared_safely_by_threads(tmp_path: Path) -> None:
    cache = LLMCache(tmp_path / "cache.sqlite")

    def work(i: int) -> Any:
        cache.put("b", "m", "completion", f"p{i % 5}", {}, {"texts": [str(i % 5)]})
        return LLMCache(cache.path).get("b", "m", "completion", f"p{i % 5}", {})

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(work, range(40)))
    assert got == [{"texts": [str(i % 5)]} for i in range(40)]
    assert len(cache) == 5


def test_chat_explainer_sends_the_few_shot_prompt_as_turns_and_parses_the_reply(server: LoopbackServer) -> None:
    from pipeline.core.interpret import explain_layer
    from pipeline.core.prompts import EXPLAIN_CHAT_VERSION, FEW_SHOT
    from pipeline.core.units import Example, Unit

    n = len(FEW_SHOT) + 1
    # A chatty reply that repeats the prompt's sentence: the explanation is what follows it.
    server.state.queued = [f"Explanation of neuron {n} behavior: the main thing this neuron does is find digits.\n"]
    train = Example("top", "train", 0, 0, ("a", "1"), (5, 6), np.array([0.0, 3.0], dtype=np.float32))
    unit = Unit(0, 7, "+", 3.0, (train,), ({"token_id": 6, "token": "1", "mean_activation": 3.0, "count": 2},))
    frame = explain_layer([unit], backend(server, api="chat"), PARAMS)
    row = frame.filter(frame["kind"] == "llm").row(0, named=True)
    assert (row["explanation"], row["failure_reason"], row["prompt_version"]) == ("digits", None, EXPLAIN_CHAT_VERSION)
    messages = server.state.bodies[-1]["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(FEW_SHOT) + ["user"]
    assert messages[2]["content"] == f"{FEW_SHOT[0].explanation}."
    assert messages[-1]["content"] == (
        f"Neuron {n}\nActivations:\n<start>\na\t0\n1\t10\n<end>\nSame activations, with the zeros left out:\n"
        f"<start>\n1\t10\n<end>\nExplanation of neuron {n} behavior: the main thing this neuron does is find"
    )


def test_an_explanation_that_copies_few_shot_text_is_drawn_again_with_another_seed(server: LoopbackServer) -> None:
    """The explainer's first reply repeats a few-shot explanation; the sample is asked again with a
    new seed, the fresh reply replaces it, and the row says it was drawn again. A reply that copies
    in every round stays, flagged degenerate."""
    from pipeline.core.interpret import REDRAW_ROUNDS, explain_layer
    from pipeline.core.prompts import FEW_SHOT, SIMULATE_FEW_SHOT
    from pipeline.core.units import Example, Unit

    copy = FEW_SHOT[1].explanation
    units = [
        Unit(
            0,
            n,
            "+",
            3.0,
            (Example("top", "train", 0, 0, ("a", str(n)), (5, n), np.array([0.0, 3.0], dtype=np.float32)),),
            ({"token_id": n, "token": str(n), "mean_activation": 3.0, "count": 2},),
        )
        for n in (7, 8)  # different top records: one prompt each
    ]
    # Unit 7 copies once, then writes its own; unit 8 copies a simulator example in every round.
    server.state.queued = [f" {copy}.\n", f" {SIMULATE_FEW_SHOT[0].explanation}\n", " years in dates\n"]
    server.state.queued += [f" {SIMULATE_FEW_SHOT[0].explanation}\n"] * REDRAW_ROUNDS
    frame = explain_layer(units, backend(server, max_concurrency=1), PARAMS)  # one at a time: replies in order
    llm = frame.filter(frame["kind"] == "llm").sort("neuron")
    assert llm.select("neuron", "explanation", "copies_redrawn").rows() == [
        (7, "years in dates", 1),
        (8, SIMULATE_FEW_SHOT[0].explanation, REDRAW_ROUNDS),
    ]
    assert llm["degenerate_reason"].to_list()[0] is None
    assert llm["degenerate_reason"].to_list()[1].startswith("repeats the few-shot explanation")
    seeds = [b["seed"] for b in server.state.bodies]
    assert seeds[:2] == [PARAMS.seed] * 2 and len(set(seeds[2:])) == REDRAW_ROUNDS, seeds
    assert PARAMS.seed not in seeds[2:]


def test_completions_backend_refuses_a_chat_prompt(server: LoopbackServer) -> None:
    with pytest.raises(AtlasInputError, match="needs api: chat"):
        backend(server).complete([[{"role": "user", "content": "hi"}]], PARAMS)
    assert server.state.requests == 0


def test_bodies_are_read_with_orjson_or_json_alike() -> None:
    """A server writing -Infinity (Python's json does, e.g. llama-cpp-python) is read through `json`;
    either way the parsers see the same fields, and non-finite logprobs are dropped."""
    reply = {
        "choices": [
            {
                "index": 0,
                "text": "ab",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "top_logprobs": [None, {"x": -math.inf, "y": -0.5}],
                    "text_offset": [0, 1],
                },
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 0},
    }
    with_infinity = json.dumps(reply).encode()
    assert b"-Infinity" in with_infinity
    finite = json.dumps(
        reply
        | {
            "choices": [
                reply["choices"][0]
                | {"logprobs": reply["choices"][0]["logprobs"] | {"top_logprobs": [None, {"y": -0.5}]}}
            ]
        }
    ).encode()
    for body in (with_infinity, finite):
        resp = read_json(body)
        assert resp.usage.prompt_tokens == 2 and resp.choices[0].logprobs.tokens == ["a", "b"]
        echo = _parse_echo(resp, "ab", 0)
        assert echo["tokens"] == ["a", "b"] and echo["text_offset"] == [0, 1]
        assert [echo["top_logprobs"][i] for i in range(2)] == [{}, {"y": -0.5}]
    assert read_json(b"[1, 2]") == [1, 2]  # not an object: left for the parsers to refuse

"""A server backend works on many units at once: `simulate_layer` hands every explanation of a stage
to the simulator together, so the server has requests of different units in flight under one
`max_concurrency` limit (bench/server.py measures the throughput this buys).

The loopback server records which prompts were in flight together. The control is the old path,
one explanation at a time (`OneAtATime`, the base class's sequential `simulate_many`): its
requests overlap too (one explanation's sequences), but never across units, so the check fails
there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from loopback_llm import LoopbackServer, ServerState, bypass_proxies

from bench.server import OneAtATime
from pipeline.core.interpret import EXPLANATION_SCHEMA, LLM, simulate_layer
from pipeline.core.simulator import Simulator
from pipeline.core.units import Example, Unit, UnitKey
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_openai import OpenAIBackend
from pipeline.infra.simulate_remote import ChatSimulator, EchoSimulator

N_UNITS = 6
VALID = 2  # valid sequences per unit: one explanation alone already has 2 requests in flight
CONCURRENCY = 8


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    bypass_proxies(monkeypatch)


def token(neuron: int, k: int) -> str:
    """Unit `neuron`'s k-th sequence is this one token: a prompt names its unit."""
    return f"u{neuron}s{k}x"


def unit_of(prompt: str) -> set[int]:
    return {n for n in range(N_UNITS) for k in range(VALID + 2) if token(n, k) in prompt}


def make_units() -> dict[UnitKey, Unit]:
    out = {}
    for n in range(N_UNITS):
        splits = ["valid"] * VALID + ["calibration", "test"]
        examples = tuple(
            Example("top", split, k, n * 10 + k, (token(n, k),), (n * 10 + k,), np.array([1.0], dtype=np.float32))
            for k, split in enumerate(splits)
        )
        out[(0, n, "+")] = Unit(
            0, n, "+", 1.0, examples, ({"token": token(n, 0), "token_id": n, "mean_activation": 1},)
        )
    return out


def explanations() -> pl.DataFrame:
    rows = [
        {"layer": 0, "neuron": n, "polarity": "+", "kind": LLM, "sample_index": 0, "explanation": f"topic {n}"}
        for n in range(N_UNITS)
    ]
    return pl.DataFrame(rows, schema=EXPLANATION_SCHEMA)


def chat_state() -> ServerState:
    """Chat replies that write each sequence's one token back with level 3."""
    replies = [(f'"{token(n, k)}"', f'"{token(n, k)}"\t3\n') for n in range(N_UNITS) for k in range(VALID + 2)]
    return ServerState(delay_s=0.05, replies=replies, level_probs=[{"3": 1.0}])


def simulator(api: str, server: LoopbackServer, cache: LLMCache | None = None) -> Simulator:
    backend = OpenAIBackend("m", server.base_url, api=api, max_concurrency=CONCURRENCY, timeout_s=10, cache=cache)
    return EchoSimulator(backend) if api == "completions" else ChatSimulator(backend)


@pytest.fixture(params=["completions", "chat"])
def api(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def state_for(api: str) -> ServerState:
    if api == "chat":
        return chat_state()
    return ServerState(delay_s=0.05, slot_probs=[{"3": 1.0}])


@pytest.mark.parametrize("gathered", [True, False], ids=["across-units", "control-one-at-a-time"])
def test_the_server_has_requests_of_different_units_in_flight_together(api: str, gathered: bool) -> None:
    state = state_for(api)
    with LoopbackServer(state) as server:
        sim = simulator(api, server)
        sims = simulate_layer(explanations(), make_units(), sim if gathered else OneAtATime(sim))
    assert sims["failure_reason"].null_count() == sims.height, sims["failure_reason"].drop_nulls().to_list()
    assert sims.filter(pl.col("split") == "valid").height == N_UNITS * VALID
    assert sims["simulated"].to_list()[0] == [3.0]
    units_together = max((len(set().union(*map(unit_of, group))) for group in state.together), default=0)
    assert state.max_in_flight > 1, "one explanation's sequences are asked together on both paths"
    if gathered:
        assert units_together > 1, "requests of different units were never in flight together"
        assert state.max_in_flight <= CONCURRENCY
    else:  # the control: the check above must fail on the old path
        assert units_together == 1


def test_a_gathered_run_caches_each_answer_fails_sequences_alone_and_resumes(api: str, tmp_path: Path) -> None:
    """Unit 2's calibration sequence is refused (HTTP 401, not retried): only its row fails, every
    other answer is cached, and a rerun asks the server for that sequence alone."""
    state = state_for(api)
    state.plan = {token(2, VALID): ["401"]}
    cache = LLMCache(tmp_path / "cache.sqlite")
    with LoopbackServer(state) as server:
        first = simulate_layer(explanations(), make_units(), simulator(api, server, cache))
        asked, stored = state.requests, len(cache)
        again = simulate_layer(explanations(), make_units(), simulator(api, server, LLMCache(cache.path)))
    failed = first.filter(pl.col("failure_reason").is_not_null())
    assert failed.select("neuron", "split", "control").rows() == [(2, "calibration", False)]
    assert "HTTP 401" in failed["failure_reason"][0]
    assert stored == asked - 1, "every answered request was stored"
    assert state.requests == asked + 1, "the rerun asked only for the refused sequence"
    assert again["failure_reason"].null_count() == again.height


def test_two_samples_with_the_same_text_cost_one_set_of_requests() -> None:
    """Identical requests in flight together are asked once (the old path found the second in the cache)."""
    state = ServerState(delay_s=0.05, slot_probs=[{"3": 1.0}])
    frame = pl.concat([explanations(), explanations().with_columns(pl.lit(1, pl.Int16).alias("sample_index"))])
    with LoopbackServer(state) as server:
        sims = simulate_layer(frame, make_units(), simulator("completions", server))
    valid = sims.filter(pl.col("split") == "valid")
    assert valid.height == 2 * N_UNITS * VALID and valid["simulated"].null_count() == 0
    chosen, controls = N_UNITS * 2, N_UNITS  # calibration + test of each unit's chosen sample; its control on test
    assert state.requests == N_UNITS * VALID + chosen + controls

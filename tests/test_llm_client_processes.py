"""`OpenAIBackend(client_processes=N)`: the request, its parsing and the caller's reduction in client
processes, against the loopback server (tests/loopback_llm.py), as tests/test_llm_openai.py does for
one process. The same workload (successes, every scripted fault, the simulators, the cache) must
give the same results, usage, server traffic and cache contents with 2 processes as with 1; a dead
process must fail its batch, not hang it; and the processes must be gone after close or collection.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback_llm import LoopbackServer, ServerState, bypass_proxies

from pipeline.core.llm import Completion, GenerationParams, LLMFailure
from pipeline.core.simulator import Job
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_openai import OpenAIBackend, _Attempt, _ClientSettings, _Echo
from pipeline.infra.llm_processes import ClientProcessDied
from pipeline.infra.simulate_remote import ChatSimulator, EchoSimulator, read_chat_levels, slot_distributions

KEY = "sk-test-PLANTED-mp-456"
KEY_ENV = "NEURON_ATLAS_TEST_LLM_KEY"
PARAMS = GenerationParams(max_tokens=8, temperature=0.0, stop=("\n",))
CHAT_TOKENS = ["The", " cat", " sat"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    bypass_proxies(monkeypatch)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(ServerState()) as srv:
        yield srv


def backend(server: LoopbackServer, processes: int, **kw: Any) -> OpenAIBackend:
    options: dict[str, Any] = {
        "api_key_env": KEY_ENV,
        "max_concurrency": 3,
        "timeout_s": 1.0,
        "max_attempts": 7,
        "backoff_base_s": 0.001,
        "backoff_cap_s": 0.01,
        "client_processes": processes,
    }
    return OpenAIBackend("test-model", server.base_url, **(options | kw))


def leaky_reducer(echo: Any, prompt: str, word: str) -> Any:
    """A reducer with a bug that quotes the key (importable by the client processes)."""
    raise RuntimeError(f"{word} {os.environ[KEY_ENV]}")


def client_processes() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("openai-client")]


def collected_within(seconds: float) -> bool:
    """Whether the client processes are gone within `seconds` of collecting garbage again and again:
    on a loaded machine the reader thread may hold the last reference to the backend for a moment."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if not client_processes():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def fresh_state() -> ServerState:
    """A server scripted with every fault, echo slots that need the "10" split, and chat replies."""
    return ServerState(
        plan={
            "FLAKY": ["500", "malformed", "empty", "reset", "truncated"],
            "LIMITED": ["429"],
            "REFUSED": ["401"],  # quotes the Authorization header (the key) back
            "DOOMED": ["500"] * 20,
            "TIMEOUT": ["slow"],
        },
        retry_after="0",
        slow_s=1.6,
        slot_probs=[{"1": 0.6, "3": 0.4}, {"2": 0.7, " 5": 0.3}],
        next_probs={"0": 0.6, "\n": 0.2, "x": 0.2},
        level_probs=[{"3": 0.5, "4": 0.5}, {"7": 0.9, "8": 0.1}],
        replies=[("cats", "".join(f"{t}\t3\n" for t in CHAT_TOKENS))],
    )


def to_plain(value: Any) -> Any:
    """Results with arrays as lists, for equality."""
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def workload(llm: OpenAIBackend) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["complete"] = llm.complete(["FLAKY a", "LIMITED b", "REFUSED c", "DOOMED d", "TIMEOUT e", "fine f"], PARAMS)
    out["samples"] = llm.complete(["two please"], dataclasses.replace(PARAMS, n=2))
    echo = EchoSimulator(llm, top_logprobs=5)
    jobs = [Job("cats", (("a", "b"), ("c",), ())), Job("dogs", (("d", "e", "f"),))]
    out["echo"] = to_plain(echo.simulate_many(jobs))
    out["echo again"] = to_plain(echo.simulate_many(jobs))  # from the cache
    chat = ChatSimulator(llm, top_logprobs=5)
    out["chat"] = to_plain(chat.simulate_each("cats", [CHAT_TOKENS, ["dog"]]))
    out["next"] = llm.next_logprobs(["after this"], 3)
    readers = [functools.partial(read_chat_levels, tokens=["x"], logprobs=True)]
    out["completion levels"] = llm.completion_levels(["label me"], PARAMS, 3, readers, version="t")
    # A reducer no other process can run (a lambda) runs in this one.
    out["lambda"] = llm.echo_levels(["x\tunknown\n"], 5, [lambda echo, prompt: len(echo.tokens)], version="t")
    # A reducer that finds no level: `Unusable`, a failure of that prompt alone, not retried.
    none = [functools.partial(slot_distributions, slots=[0])]
    out["unusable"] = llm.echo_levels(["nothing here"], 5, none, version="t")
    return out


def cache_rows(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("select key, kind, value from responses").fetchall())


def test_two_processes_answer_as_one_does(server: LoopbackServer, tmp_path: Path) -> None:
    seen = {}
    for processes in (1, 2):
        server.state = state = fresh_state()
        llm = backend(server, processes, cache=LLMCache(tmp_path / f"{processes}.sqlite"))
        llm.start_client_processes()
        try:
            results = workload(llm)
        finally:
            llm.close()
        usage = llm.usage.snapshot()
        seen[processes] = (results, usage, state.requests, cache_rows(tmp_path / f"{processes}.sqlite"))
        assert state.max_in_flight <= 3, "the limit holds over all processes together"
        assert set(state.auth_headers) == {f"Bearer {KEY}"}, "each process sent the key from the environment"

    one, two = seen[1], seen[2]
    for name in one[0]:
        assert two[0][name] == one[0][name], name
    assert two[1] == one[1], "usage: requests (retries included), tokens and cache hits"
    assert two[2] == one[2], "the server saw as many requests"
    assert two[3] == one[3], "the cache holds the same values"

    # The faults came out as the one-process path maps them (and these checks would catch a
    # client process that swallowed them into successes).
    flaky, limited, refused, doomed, timeout, fine = two[0]["complete"]
    assert isinstance(flaky, Completion) and isinstance(limited, Completion) and isinstance(fine, Completion)
    assert isinstance(refused, LLMFailure) and refused.attempts == 1 and refused.reason.startswith("HTTP 401")
    assert "<api key>" in refused.reason and KEY not in refused.reason
    assert isinstance(doomed, LLMFailure) and doomed.attempts == 7 and "gave up after 7 attempts" in doomed.reason
    assert isinstance(timeout, LLMFailure) and timeout.attempts == 1 and "not resent" in timeout.reason
    assert two[0]["samples"][0].texts == ["reply to two please"] * 2
    (unusable,) = two[0]["unusable"]
    assert isinstance(unusable, LLMFailure) and unusable.attempts == 1
    assert two[0]["lambda"] == [4]  # x, tab, unknown, line end
    assert two[1]["cache_hits"] > 0 and two[1]["prompt_tokens"] > 0
    assert not client_processes(), "closed"


def test_the_key_never_travels_to_the_client_processes() -> None:
    """The processes read the key from the variable named in their settings; neither the settings
    nor a request carries it."""
    settings = _ClientSettings("http://127.0.0.1:1/v1", KEY_ENV, 1.0, False)
    job = _Attempt(_Echo("m", 5, 0), "prompt", functools.partial(slot_distributions, slots=[1]), False)
    assert KEY.encode() not in pickle.dumps(settings) and KEY.encode() not in pickle.dumps(job)
    assert KEY_ENV.encode() in pickle.dumps(settings)


def test_a_dead_process_fails_the_batch_and_the_next_batch_starts_anew(server: LoopbackServer) -> None:
    server.state.delay_s = 1.0
    llm = backend(server, 2, max_concurrency=4)
    first = llm.start_client_processes()
    assert first is not None and len(first.pids) == 2
    got: dict[str, Any] = {}

    def batch() -> None:
        try:
            got["result"] = llm.complete([f"prompt {i}" for i in range(8)], PARAMS)
        except Exception as exc:
            got["error"] = exc

    thread = threading.Thread(target=batch)
    start = time.monotonic()
    thread.start()
    while server.state.in_flight < 4 and time.monotonic() - start < 10:
        time.sleep(0.01)
    os.kill(first.pids[0], signal.SIGKILL)
    thread.join(15)
    assert not thread.is_alive(), "the batch hung"
    error = got.get("error")
    assert isinstance(error, ClientProcessDied), got
    assert "killed by SIGKILL" in str(error) and "in flight" in str(error)
    assert KEY not in str(error)

    server.state.delay_s = 0.0
    again = llm.complete(["after"], PARAMS)  # a new pool: the dead one is not reused
    assert again == [Completion(["reply to after"], prompt_tokens=1, completion_tokens=1, truncated=(True,))]
    assert llm._pool is not None and llm._pool is not first
    assert all(not p.is_alive() for p in (w.process for w in first._state.workers))
    llm.close()
    assert not client_processes()


def test_a_server_that_ignores_n_then_processes_shut_down_when_the_backend_is_collected(
    server: LoopbackServer,
) -> None:
    """What one client process learns (the server ignores `n`) reaches the others through the parent,
    as in tests/test_llm_openai.py's one-process case; then the processes go with the backend."""
    server.state.ignore_n = True
    server.state.queued = ["a", "b", "c", "d", "e", "f"]
    llm = backend(server, 2, max_concurrency=1)
    first, second = llm.complete(["one", "two"], dataclasses.replace(PARAMS, n=3, seed=7))
    assert isinstance(first, Completion) and first.texts == ["a", "b", "c"] and first.completion_tokens == 3
    assert isinstance(second, Completion) and second.texts == ["d", "e", "f"]
    assert [(b.get("n"), b.get("seed")) for b in server.state.bodies] == [
        (3, 7), (1, 8), (1, 9), (1, 7), (1, 8), (1, 9)
    ]  # fmt: skip
    assert len(client_processes()) == 2

    # An error that is no failure of the request (a bug in a reducer) is raised here as it was
    # raised there, with the key scrubbed from its text and the client process's traceback.
    with pytest.raises(RuntimeError) as info:
        llm.echo_levels(["x\tunknown\n"], 5, [functools.partial(leaky_reducer, word="oops")], version="t")
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "oops <api key>" in text and KEY not in text and "in a client process" in text
    del info, llm  # (the traceback holds the backend too)
    assert collected_within(10.0), client_processes()


def test_client_processes_must_be_at_least_one(server: LoopbackServer) -> None:
    with pytest.raises(ValueError, match="client_processes must be at least 1"):
        backend(server, 0)
    assert backend(server, 1).start_client_processes() is None


def test_bench_server_imports_no_torch_dagster_or_duckdb() -> None:
    """bench.server runs on a bare host (numpy, orjson, openai, httpx, pydantic, polars)."""
    code = "import sys, bench.server; print(sorted(m for m in ('torch', 'dagster', 'duckdb') if m in sys.modules))"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_resources_pass_client_processes_to_the_backend(tmp_path: Path) -> None:
    from assets.resources import ExplainerResource, SimulatorResource

    common = {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "cache_path": str(tmp_path / "c.sqlite")}
    simulator = SimulatorResource(**common, client_processes=3).client()
    assert isinstance(simulator, EchoSimulator) and simulator.llm.client_processes == 3
    explainer = ExplainerResource(**common, client_processes=2).client()
    assert isinstance(explainer, OpenAIBackend) and explainer.client_processes == 2
    assert SimulatorResource(**common).client().llm.client_processes == 1  # type: ignore[attr-defined]
    assert not client_processes(), "no process starts before a request"

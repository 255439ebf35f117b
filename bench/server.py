"""Benchmark of a server backend's throughput: requests/s over one layer's explain and simulate
stages against the loopback server with a fixed latency, today's path (one client process, the
default, and `--client-processes` of them) against the old one-explanation-at-a-time path,
measured in one run.

Run `python -m bench.server`. The layer has 64 units (default), each with the default sampling's
held-out examples (5 top + 5 random sequences of 64 tokens per split), two LLM explanations and the
token-space one, as `explain_layer` and `simulate_layer` make them. The server
(tests/loopback_llm.py, in `--server-processes` (4) child processes on one port, so its threads do
not share this one's interpreter lock and its own CPU per request does not cap the rate) answers
every request after `--delay-s` (100 ms), and the backend allows `--concurrency` (32) requests in
flight, so no client can beat concurrency / delay requests/s: each path's rate is printed as a
share of that ideal. Both paths use a fresh response cache on disk (each answer is
committed as it arrives, as in a real run). The old path is the same simulator driven one
explanation at a time (`Simulator.simulate_many`'s sequential default) and the explainer in
chunks of `batch_hint` prompts, which is what `simulate_layer` and `explain_layer` did before;
it runs on the layer's first `--old-units` (16) units, since one explanation at a time its rate
does not depend on the layer's size (and the whole layer would take minutes).

One Python process spends several ms of CPU per request (the SDK's request path, parsing the JSON,
reducing each slot's top logprobs) and so tops out near 150 requests/s under its interpreter lock,
whatever the cores: `--client-processes N` (4) runs the same layer again with the backend's
`client_processes=N`, which does that work in N spawned processes (their CPU is counted in the
client's CPU per request, read from /proc where there is one). Its simulations must equal the
default path's. The client processes, this one and the server's need about N + 2 cores to show
the gain.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.interpret import explain_layer, simulate_layer
from pipeline.core.llm import Completion, GenerationParams, LLMBackend, LLMFailure, Prompt, Usage
from pipeline.core.simulator import Simulator
from pipeline.core.units import Example, Unit, UnitKey
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_openai import OpenAIBackend
from pipeline.infra.simulate_remote import EchoSimulator

GOAL = 0.8  # share of the ideal concurrency / latency
WORDS = [f"w{i}" for i in range(512)]
SPLITS = ("train", "calibration", "valid", "test")


def make_units(n_units: int, per_kind: int, seq_len: int, seed: int = 0) -> dict[UnitKey, Unit]:
    """A layer of live units with `per_kind` top and random sequences in each split, and distinct top tokens."""
    rng = np.random.default_rng(seed)
    out: dict[UnitKey, Unit] = {}
    seq_id = 0
    for neuron in range(n_units):
        examples = []
        for split in SPLITS:
            for kind in ("top", "random"):
                for rank in range(per_kind):
                    ids = rng.integers(0, len(WORDS), seq_len)
                    acts = rng.random(seq_len).astype(np.float32)
                    tokens = tuple(WORDS[i] for i in ids)
                    examples.append(Example(kind, split, rank, seq_id, tokens, tuple(int(i) for i in ids), acts))
                    seq_id += 1
        top = tuple(
            {"token": WORDS[(neuron * 3 + k) % len(WORDS)], "token_id": (neuron * 3 + k) % len(WORDS),
             "mean_activation": 1.0 - 0.1 * k}
            for k in range(3)
        )  # fmt: skip
        unit = Unit(0, neuron, "+", 1.0, tuple(examples), top)
        out[unit.key] = unit
    return out


class Chunked(LLMBackend):
    """The old explain path: `complete` per chunk of `batch_hint` prompts (the base class's default)."""

    def __init__(self, inner: OpenAIBackend):
        self.inner = inner
        self.backend, self.model, self.api = inner.backend, inner.model, inner.api

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        return self.inner.complete(prompts, params)


class OneAtATime(Simulator):
    """The old simulate path: one explanation's sequences at a time (the base class's `simulate_many`)."""

    def __init__(self, inner: Simulator):
        self.inner = inner
        self.backend, self.model, self.prompt_version = inner.backend, inner.model, inner.prompt_version

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        return self.inner.simulate(explanation, sequences)

    def simulate_each(self, explanation: str, sequences: Sequence[Sequence[str]]):  # type: ignore[override]
        return self.inner.simulate_each(explanation, sequences)


def _serve(conn, delay_s: float, replies: list[str], counts, port: int) -> None:  # type: ignore[no-untyped-def]
    """Child process: one of the loopback server's processes; answers "cpu" and "stop" over the pipe.
    The request counters live in `counts` (shared memory: requests, in flight, most in flight), under
    its one lock, so they count the requests of every process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from loopback_llm import LoopbackServer, ServerState

    def shared(i: int) -> property:
        return property(lambda _: counts[i], lambda _, value: counts.__setitem__(i, value))

    class SharedState(ServerState):
        requests = shared(0)
        in_flight = shared(1)
        max_in_flight = shared(2)

    # Echo: every slot's level distribution holds no "1", so no request splits 1 from 10.
    state = SharedState(
        delay_s=delay_s, queued=list(replies), slot_probs=[{"0": 0.7, "2": 0.2, "3": 0.1}], lock=counts.get_lock()
    )
    with LoopbackServer(state, port=port, reuse_port=True) as server:
        conn.send(server.base_url)
        while (msg := conn.recv()) != "stop":
            if msg == "cpu":
                conn.send(time.process_time())
    conn.send("stopped")


class Server:
    """The loopback server in `processes` child processes on one port, so its CPU per request (a
    few ms: one Python process would top out near 250 requests/s) does not cap the client's rate."""

    def __init__(self, delay_s: float, n_replies: int, processes: int):
        ctx = multiprocessing.get_context("spawn")
        self.counts = ctx.Array("q", 3)  # requests, in flight, most in flight
        self.children: list[tuple[Any, Any]] = []
        port = 0
        for k in range(processes):
            # Each process its own explanation texts, so no two units get the same one.
            own = [f" words about topic {k + processes * i}.\n" for i in range(n_replies)]
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, delay_s, own, self.counts, port), daemon=True)
            proc.start()
            self.children.append((conn, proc))
            url: str = conn.recv()
            if k == 0:
                self.base_url = url
                port = int(url.rsplit(":", 1)[1].split("/")[0])

    def stats(self) -> tuple[int, int, float]:
        """(requests so far, most in flight since the last call, the server's CPU seconds so far)."""
        cpu = 0.0
        for conn, _ in self.children:
            conn.send("cpu")
            cpu += conn.recv()
        with self.counts.get_lock():
            requests, in_flight, most = self.counts[:]
            self.counts[2] = in_flight
        return requests, most, cpu

    def close(self) -> None:
        for conn, _ in self.children:
            conn.send("stop")
        for conn, proc in self.children:
            conn.recv()
            proc.join(10)


def process_cpu_s(pids: Sequence[int]) -> float | None:
    """CPU seconds (user + system) the processes have spent, from /proc; None where it cannot be read."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


@dataclass
class PathResult:
    stages: dict[str, tuple[int, float, int]]  # stage: (requests, seconds, most in flight)
    client_cpu: float  # this process
    workers_cpu: float | None  # the client processes (0 without; None where not readable)
    server_cpu: float
    startup_s: float  # starting the client processes, before the clock
    simulations: pl.DataFrame


def run_path(old: bool, processes: int, units: dict[UnitKey, Unit], args: argparse.Namespace, root: Path) -> PathResult:
    """One path (the old one, or today's with `processes` client processes) on a fresh server and cache."""
    server = Server(args.delay_s, len(units), args.server_processes)  # one explainer request per unit
    backend = None
    try:
        cache = LLMCache(root / f"{'old' if old else 'new'}-{processes}" / "cache.sqlite")
        backend = OpenAIBackend(
            "bench-model",
            server.base_url,
            max_concurrency=args.concurrency,
            timeout_s=60.0,
            cache=cache,
            client_processes=processes,
        )
        startup = time.perf_counter()
        pool = backend.start_client_processes()  # their imports are not what this measures
        startup = time.perf_counter() - startup
        pids = pool.pids if pool is not None else []
        explainer: LLMBackend = Chunked(backend) if old else backend
        simulator: Simulator = EchoSimulator(backend, top_logprobs=15)
        if old:
            simulator = OneAtATime(simulator)
        out = {}
        before, _, server_cpu = server.stats()
        workers_cpu = process_cpu_s(pids)
        client_cpu = time.process_time()
        start = time.perf_counter()
        explanations = explain_layer(list(units.values()), explainer, GenerationParams(n=args.samples))
        seconds = time.perf_counter() - start
        requests, in_flight, _ = server.stats()
        out["explain"] = (requests - before, seconds, in_flight)
        start = time.perf_counter()
        simulations = simulate_layer(explanations, units, simulator)
        seconds = time.perf_counter() - start
        total, in_flight, server_end = server.stats()
        out["simulate"] = (total - requests, seconds, in_flight)
        client_cpu = time.process_time() - client_cpu
        workers_end = process_cpu_s(pids)
        workers = None if workers_cpu is None or workers_end is None else workers_end - workers_cpu
        failed = simulations.filter(simulations["failure_reason"].is_not_null()).height
        if failed:
            raise SystemExit(f"{failed} simulation rows failed: {simulations['failure_reason'].drop_nulls()[0]}")
        return PathResult(out, client_cpu, workers, server_end - server_cpu, startup, simulations)
    finally:
        if backend is not None:
            backend.close()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=64, help="units of the layer")
    parser.add_argument("--delay-s", type=float, default=0.1, help="the server's latency per request")
    parser.add_argument("--concurrency", type=int, default=32, help="the backend's max_concurrency")
    parser.add_argument("--samples", type=int, default=2, help="LLM explanations per unit")
    parser.add_argument("--per-kind", type=int, default=5, help="top and random sequences per split")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--server-processes", type=int, default=4, help="processes of the loopback server (one port)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="client processes of the multi-process path (the backend's client_processes); 1 skips that path",
    )
    parser.add_argument(
        "--old-units",
        type=int,
        default=16,
        help="units the old path runs on: one explanation at a time, its rate does not grow with the layer",
    )
    args = parser.parse_args()

    units = make_units(args.units, args.per_kind, args.seq_len)
    ideal = args.concurrency / args.delay_s
    load = os.getloadavg()[0]
    print(
        f"layer of {args.units} units, {args.samples} LLM explanations + token-space each; {2 * args.per_kind}"
        f" held-out sequences of {args.seq_len} tokens per split; server latency {args.delay_s * 1000:g} ms,"
        f" max_concurrency {args.concurrency}: ideal {ideal:g} requests/s; loopback server in"
        f" {args.server_processes} processes; {os.cpu_count()} CPUs, load"
        f" average {load:.1f} before the run"
    )
    many = args.client_processes
    if many < 1:
        raise SystemExit("--client-processes must be at least 1")
    if many > 1 and (os.cpu_count() or 1) < many + 2:
        print(
            f"note: {many} client processes, this one and the server's want {many + 2} cores; this host has"
            f" {os.cpu_count()}, so the multi-process figure here understates what it does on a bigger one"
        )
    old_units = dict(list(units.items())[: args.old_units])
    paths = {
        "old": (f"one explanation at a time (before; first {len(old_units)} units)", old_units, 1),
        "one": (f"across units, 1 client process (default; {len(units)} units)", units, 1),
    }
    if many > 1:
        paths["many"] = (f"across units, {many} client processes ({len(units)} units)", units, many)
    results: dict[str, PathResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, path_units, processes) in paths.items():
            results[name] = run_path(name == "old", processes, path_units, args, Path(tmp))
    rates = {}
    for name, (label, _, processes) in paths.items():
        result = results[name]
        requests = sum(r for r, _, _ in result.stages.values())
        seconds = sum(s for _, s, _ in result.stages.values())
        rates[name] = requests / seconds
        detail = ", ".join(
            f"{stage} {r} req in {s:.2f} s, max {m} in flight" for stage, (r, s, m) in result.stages.items()
        )
        print(f"{label}: {rates[name]:.0f} req/s = {rates[name] / ideal:.0%} of ideal ({detail})")
        per = 1000 / requests
        client = f"client {result.client_cpu * per:.1f} ms"
        if processes > 1:
            there = "n/a (no /proc)" if result.workers_cpu is None else f"{result.workers_cpu * per:.1f} ms"
            client = (
                f"client {result.client_cpu * per:.1f} ms in this process + {there} in the {processes} client"
                f" processes (started in {result.startup_s:.1f} s, before the clock)"
            )
        print(f"  CPU per request: {client} + loopback server {result.server_cpu * per:.1f} ms")
    if "many" in results:
        same = results["many"].simulations.equals(results["one"].simulations)
        print(f"{many} client processes' simulations equal the default path's: {'yes' if same else 'NO'}")
    best = max(rates, key=rates.__getitem__)
    ratios = [f"default {rates['one'] / rates['old']:.2f}x the old path"]
    if "many" in rates:
        ratios.append(
            f"{many} client processes {rates['many'] / rates['one']:.2f}x the default,"
            f" {rates['many'] / rates['old']:.2f}x the old path"
        )
    share = rates[best] / ideal
    print(
        f"speed-up: {'; '.join(ratios)}; best ({paths[best][0].split(' (')[0]}) at {share:.0%} of ideal"
        f" (goal >= {GOAL:.0%}: {'met' if share >= GOAL else 'NOT met'})"
    )


if __name__ == "__main__":
    main()

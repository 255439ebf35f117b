"""Benchmark of a server backend's throughput: requests/s over one layer's explain and simulate
stages against the loopback server with a fixed latency, today's path against the old one-
explanation-at-a-time path, measured in one run.

Run `python -m bench.server`. The layer has 64 units (default), each with the default sampling's
held-out examples (5 top + 5 random sequences of 64 tokens per split), two LLM explanations and the
token-space one, as `explain_layer` and `simulate_layer` make them. The server
(tests/loopback_llm.py, in a child process so its threads do not share this one's interpreter
lock) answers every request after `--delay-s` (100 ms), and the backend allows `--concurrency`
(32) requests in flight, so no client can beat concurrency / delay requests/s: each path's rate is
printed as a share of that ideal. Both paths use a fresh response cache on disk (each answer is
committed as it arrives, as in a real run). The old path is the same simulator driven one
explanation at a time (`Simulator.simulate_many`'s sequential default) and the explainer in
chunks of `batch_hint` prompts, which is what `simulate_layer` and `explain_layer` did before;
it runs on the layer's first `--old-units` (16) units, since one explanation at a time its rate
does not depend on the layer's size (and the whole layer would take minutes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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


def _serve(conn, delay_s: float, replies: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Child process: the loopback server; answers "url", "stats" and "stop" over the pipe."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from loopback_llm import LoopbackServer, ServerState

    # Echo: every slot's level distribution holds no "1", so no request splits 1 from 10.
    state = ServerState(delay_s=delay_s, queued=list(replies), slot_probs=[{"0": 0.7, "2": 0.2, "3": 0.1}])
    with LoopbackServer(state) as server:
        conn.send(server.base_url)
        while (msg := conn.recv()) != "stop":
            if msg == "stats":
                with state.lock:
                    conn.send((state.requests, state.max_in_flight, time.process_time()))
                    state.max_in_flight = state.in_flight
    conn.send("stopped")


class Server:
    def __init__(self, delay_s: float, replies: list[str]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, delay_s, replies), daemon=True)
        self.proc.start()
        self.base_url: str = self.conn.recv()

    def stats(self) -> tuple[int, int, float]:
        """(requests so far, most in flight since the last call, the server's CPU seconds so far)."""
        self.conn.send("stats")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.proc.join(10)


def run_path(
    old: bool, units: dict[UnitKey, Unit], args: argparse.Namespace, root: Path
) -> tuple[dict[str, tuple[int, float, int]], float, float]:
    """({stage: (requests, seconds, most in flight)}, client CPU s, server CPU s) for one path, on a
    fresh server and cache."""
    n_explainer_requests = len(units)
    replies = [f" words about topic {i}.\n" for i in range(n_explainer_requests)]
    server = Server(args.delay_s, replies)
    try:
        cache = LLMCache(root / ("old" if old else "new") / "cache.sqlite")
        backend = OpenAIBackend(
            "bench-model", server.base_url, max_concurrency=args.concurrency, timeout_s=60.0, cache=cache
        )
        explainer: LLMBackend = Chunked(backend) if old else backend
        simulator: Simulator = EchoSimulator(backend, top_logprobs=15)
        if old:
            simulator = OneAtATime(simulator)
        out = {}
        before, _, server_cpu = server.stats()
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
        failed = simulations.filter(simulations["failure_reason"].is_not_null()).height
        if failed:
            raise SystemExit(f"{failed} simulation rows failed: {simulations['failure_reason'].drop_nulls()[0]}")
        return out, client_cpu, server_end - server_cpu
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=64, help="units of the layer")
    parser.add_argument("--delay-s", type=float, default=0.1, help="the server's latency per request")
    parser.add_argument("--concurrency", type=int, default=32, help="the backend's max_concurrency")
    parser.add_argument("--samples", type=int, default=2, help="LLM explanations per unit")
    parser.add_argument("--per-kind", type=int, default=5, help="top and random sequences per split")
    parser.add_argument("--seq-len", type=int, default=64)
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
        f" max_concurrency {args.concurrency}: ideal {ideal:g} requests/s; {os.cpu_count()} CPUs, load"
        f" average {load:.1f} before the run"
    )
    old_units = dict(list(units.items())[: args.old_units])
    with tempfile.TemporaryDirectory() as tmp:
        results = {"old": run_path(True, old_units, args, Path(tmp)), "new": run_path(False, units, args, Path(tmp))}
    rates = {}
    labels = {
        "old": f"one explanation at a time (before; first {len(old_units)} units)",
        "new": f"across units (now; {len(units)} units)",
    }
    for name, label in labels.items():
        stages, client_cpu, server_cpu = results[name]
        requests = sum(r for r, _, _ in stages.values())
        seconds = sum(s for _, s, _ in stages.values())
        rates[name] = requests / seconds
        detail = ", ".join(f"{stage} {r} req in {s:.2f} s, max {m} in flight" for stage, (r, s, m) in stages.items())
        print(f"{label}: {rates[name]:.0f} req/s = {rates[name] / ideal:.0%} of ideal ({detail})")
        print(
            f"  CPU per request: client {client_cpu / requests * 1000:.1f} ms + loopback server"
            f" {server_cpu / requests * 1000:.1f} ms"
        )
    share = rates["new"] / ideal
    print(
        f"speed-up {rates['new'] / rates['old']:.2f}x; now at {share:.0%} of ideal"
        f" (goal >= {GOAL:.0%}: {'met' if share >= GOAL else 'NOT met'})"
    )


if __name__ == "__main__":
    main()

"""Benchmark of the in-process explainer + simulator: seconds per unit, today's path vs optimized, and the floor.

Run `python -m bench.interpret`. The units are real: the first neurons of a layer of the embedded
model, both directions (Gemma's MLP is gated), captured here on a small slice of the embedded
corpus with the pipeline's sampling (20 top + 20 random records: 5 + 5 per split). Each path runs
what the `explanations` and `simulations` assets run for these units: `explain_layer` (the
default explain settings: 2 samples at temperature 0.8, at most 40 tokens, few-shot text avoided)
and `simulate_layer` (every candidate on valid, the chosen ones on calibration + test, the
controls), through a fresh, empty response cache, so nothing is answered from an earlier run.

- today: `LocalBackend(plain=True)`: `generate` on the whole prompt, which it reads
  once per sample; `LocalSimulator` one explanation at a time (the base class's sequential
  `simulate_many`: each forward pass holds one explanation's ~10 sequences).
- optimized: `LocalBackend()`: the few-shot part shared with the previous prompt taken from its KV
  cache, the rest read once and the cache copied to the samples, the stop-string tables built once,
  with `--batch-requests N` the requests of N units generated in one batch;
  `LocalSimulator.simulate_many`: on a GPU the sequences of several explanations fill each
  forward pass (`--batch-size` rows); on a CPU it too takes one explanation at a time.

Each path and rep gets new backends (the first prompt of a rep pays for the whole prompt). Reps
alternate between the paths and are reported as medians: the machine is shared.

The floor is what the tokens a path processes would cost at the bare forward's speed: prompt
tokens computed (each sample's copy counted, reused ones not) plus one position per generated
token, and for simulation each explanation's own prefix plus its rows (the shared few-shot prefix
once per simulator), divided by the tokens/s of a plain batched forward of the transformer body
(no head, no cache) on the same model, measured between the reps. Generation cannot reach it: every
generated token also pays the vocabulary head (262k rows for Gemma) at batch `samples`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from bench.capture import time_bare
from pipeline.core.corpus import CorpusSpec, prefix_ids, tokenize_corpus
from pipeline.core.examples import unit_examples
from pipeline.core.interpret import LLM, explain_layer, simulate_layer
from pipeline.core.llm import GenerationParams
from pipeline.core.llm_local import DEFAULT_BATCH_REQUESTS, LocalBackend
from pipeline.core.models import SubjectModel, load_subject_model
from pipeline.core.prompts import explainer_few_shot_explanations
from pipeline.core.records import SamplingSpec, collect_activation_records, records_frame
from pipeline.core.simulate_local import LocalSimulator
from pipeline.core.simulator import Job, JobResult, OnJob, Simulator
from pipeline.core.units import Unit, units_from_frames
from pipeline.infra.llm_cache import CachedBackend, CachedSimulator, LLMCache

PATHS = ("today", "optimized")
GOAL_SPEEDUP = 2.0
GOAL_FLOOR = 1.5


def make_units(
    subject: SubjectModel, layer: int, n_units: int, n_sequences: int, seq_len: int, spec: SamplingSpec
) -> list[Unit]:
    """The first `n_units` live units of a layer (neuron order, '+' before '-'), captured on the
    embedded corpus as the pipeline's stages would."""
    corpus = tokenize_corpus(subject.tokenizer, CorpusSpec(n_sequences=n_sequences, seq_len=seq_len))
    token_ids = np.asarray(corpus.sort("seq_id")["token_ids"].to_list(), dtype=np.int64)
    records = collect_activation_records(subject, token_ids, [layer], spec, prefix=prefix_ids(subject.tokenizer))
    frame = records_frame(records[layer])
    examples = unit_examples(frame, corpus.select("seq_id", "token_ids", "tokens"))
    units = sorted(units_from_frames(examples, corpus, frame).values(), key=lambda u: (u.neuron, u.polarity))
    return [u for u in units if not u.dead][:n_units]


def bare_tokens_per_s(subject: SubjectModel, batches: Sequence[torch.Tensor]) -> float:
    """Tokens/s of the transformer body alone: batched, no cache, no head."""
    return sum(b.numel() for b in batches) / time_bare(subject, batches)


class CountingSimulator(Simulator):
    """A local simulator that counts the tokens it must process: each explanation's own prefix and
    its rows, the few-shot prefix once (it is computed once per simulator). `together`: jobs go to
    the simulator's own `simulate_many` (batched across explanations), else one at a time."""

    def __init__(self, inner: LocalSimulator, together: bool):
        self.inner, self.together = inner, together
        self.backend, self.model, self.prompt_version = inner.backend, inner.model, inner.prompt_version
        self.tokens = 0
        self._shared: set[tuple[int, ...]] = set()

    @property
    def usage(self):  # type: ignore[override]
        return self.inner.usage

    def _count(self, explanation: str, sequences: Sequence[Sequence[str]]) -> None:
        if sequences:
            shared, own = self.inner.prompt.prefix_parts(explanation)
            if tuple(shared) not in self._shared:
                self._shared.add(tuple(shared))
                self.tokens += len(shared)
            self.tokens += len(own) + sum(len(self.inner.prompt.row(t).ids) for t in sequences)

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]):  # type: ignore[override]
        self._count(explanation, sequences)
        return self.inner.simulate(explanation, sequences)

    def simulate_many(self, jobs: Sequence[Job], on_result: OnJob | None = None) -> list[JobResult]:
        for job in jobs:
            self._count(*job)
        if self.together:
            return self.inner.simulate_many(jobs, on_result)
        return Simulator.simulate_many(self.inner, jobs, on_result)


@dataclass
class PathRun:
    explain_s: float
    simulate_s: float
    explain_tokens: int  # positions computed: prompt (per sample copy) + one per generated token but the last
    simulate_tokens: int
    explanations: list[str | None]  # the LLM samples, in unit order
    simulated: np.ndarray  # every simulated level, in the simulations table's order
    simulations: int  # explanations simulated (requests)
    cache_hits: int


def run_path(
    subject: SubjectModel,
    units: Sequence[Unit],
    params: GenerationParams,
    path: str,
    cache_dir: Path,
    batch_size: int = 16,
    batch_requests: int = 1,
) -> PathRun:
    """explain_layer + simulate_layer of the units on one path, through a new, empty response cache."""
    cache = LLMCache(cache_dir / f"{path}-{time.monotonic_ns()}.sqlite")
    together = batch_requests if path == "optimized" else 1
    local = LocalBackend(subject.model, subject.tokenizer, "bench", plain=path == "today", batch_requests=together)
    backend = CachedBackend(local, cache)
    inner = LocalSimulator(subject.model, subject.tokenizer, "bench", batch_size=batch_size)
    counting = CountingSimulator(inner, together=path == "optimized")
    simulator = CachedSimulator(counting, cache)
    start = time.perf_counter()
    explanations = explain_layer(units, backend, params)
    middle = time.perf_counter()
    simulations = simulate_layer(explanations, {u.key: u for u in units}, simulator)
    end = time.perf_counter()
    llm = explanations.filter(pl.col("kind") == LLM).sort("layer", "polarity", "neuron", "sample_index")
    return PathRun(
        explain_s=middle - start,
        simulate_s=end - middle,
        explain_tokens=local.work["prompt_computed"] + local.work["decoded"],
        simulate_tokens=counting.tokens,
        explanations=llm["explanation"].to_list(),
        simulated=np.concatenate([np.asarray(v, dtype=np.float64) for v in simulations["simulated"].drop_nulls()]),
        simulations=counting.usage.snapshot()["requests"],
        cache_hits=backend.usage.snapshot()["cache_hits"] + counting.usage.snapshot()["cache_hits"],
    )


@dataclass
class Result:
    units: int
    runs: dict[str, list[PathRun]] = field(default_factory=lambda: {p: [] for p in PATHS})
    bare: list[float] = field(default_factory=list)  # tokens/s

    def per_unit(self, path: str, what: str) -> float:
        """Median seconds per unit: what = explain, simulate or total."""
        values = [
            (r.explain_s if what != "simulate" else 0.0) + (r.simulate_s if what != "explain" else 0.0)
            for r in self.runs[path]
        ]
        return statistics.median(values) / self.units

    def tokens_per_unit(self, path: str, what: str) -> float:
        run = self.runs[path][0]  # the same work every rep
        explain = run.explain_tokens if what != "simulate" else 0
        return (explain + (run.simulate_tokens if what != "explain" else 0)) / self.units

    def floor(self, path: str, what: str) -> float:
        return self.tokens_per_unit(path, what) / statistics.median(self.bare)

    def summary(self) -> dict[str, float]:
        out = {"bare_tokens_per_s": statistics.median(self.bare)}
        for path in PATHS:
            for what in ("explain", "simulate", "total"):
                out[f"{path}_{what}_s"] = self.per_unit(path, what)
                out[f"{path}_{what}_floor_s"] = self.floor(path, what)
        for what in ("explain", "simulate", "total"):
            out[f"speedup_{what}"] = self.per_unit("today", what) / self.per_unit("optimized", what)
        out["optimized_over_floor"] = self.per_unit("optimized", "total") / self.floor("optimized", "total")
        out["today_over_floor"] = self.per_unit("today", "total") / self.floor("today", "total")
        return out

    def simulated_delta(self) -> float:
        """Largest difference between the two paths' simulated levels (first rep; same explanations)."""
        a, b = self.runs["today"][0].simulated, self.runs["optimized"][0].simulated
        return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("nan")

    def identical(self) -> tuple[int, int]:
        """(LLM explanations the optimized path wrote exactly as today's, all of them), first rep."""
        a, b = self.runs["today"][0].explanations, self.runs["optimized"][0].explanations
        return sum(x == y for x, y in zip(a, b, strict=True)), len(a)


def measure(
    subject: SubjectModel,
    units: Sequence[Unit],
    params: GenerationParams,
    reps: int,
    bare_batches: Sequence[torch.Tensor],
    batch_size: int = 16,
    batch_requests: int = 1,
) -> Result:
    result = Result(units=len(units))
    with tempfile.TemporaryDirectory(prefix="bench-interpret-") as tmp:
        bare_tokens_per_s(subject, bare_batches[:1])  # warm-up
        for rep in range(reps):
            order = PATHS if rep % 2 == 0 else PATHS[::-1]
            for path in order:
                run = run_path(subject, units, params, path, Path(tmp), batch_size, batch_requests)
                result.runs[path].append(run)
                result.bare.append(bare_tokens_per_s(subject, bare_batches))
                print(
                    f"rep {rep + 1} {path}: explain {run.explain_s:.1f} s, simulate {run.simulate_s:.1f} s;"
                    f" bare {result.bare[-1]:,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    return result


def format_report(result: Result) -> str:
    s = result.summary()
    same, written = result.identical()
    hits = sum(r.cache_hits for runs in result.runs.values() for r in runs)
    lines = [
        "seconds per unit (median)      explain  simulate    total   all runs (total s per unit)",
    ]
    for path in PATHS:
        runs = " ".join(f"{(r.explain_s + r.simulate_s) / result.units:.2f}" for r in result.runs[path])
        lines.append(
            f"  {path:<27} {s[f'{path}_explain_s']:8.2f} {s[f'{path}_simulate_s']:9.2f}"
            f" {s[f'{path}_total_s']:8.2f}   {runs}"
        )
    speed = s["speedup_total"]
    lines.append(
        f"  speed-up today / optimized: explain {s['speedup_explain']:.2f}x, simulate {s['speedup_simulate']:.2f}x,"
        f" total {speed:.2f}x   goal >= {GOAL_SPEEDUP:.0f}x: {'MET' if speed >= GOAL_SPEEDUP else 'NOT MET'}"
    )
    lines.append(
        f"\nfloor: tokens processed / bare-forward {s['bare_tokens_per_s']:,.0f} tokens/s"
        f" (median of {len(result.bare)}: {' '.join(f'{b:,.0f}' for b in result.bare)})"
    )
    lines.append("  tokens per unit                explain  simulate    total   floor s per unit   time / floor")
    for path in PATHS:
        explain, simulate, total = (result.tokens_per_unit(path, w) for w in ("explain", "simulate", "total"))
        lines.append(
            f"  {path:<27} {explain:8,.0f} {simulate:9,.0f} {total:8,.0f}   {s[f'{path}_total_floor_s']:16.2f}"
            f"   {s[f'{path}_over_floor']:11.2f}x"
        )
    over = s["optimized_over_floor"]
    lines.append(
        f"  optimized within {GOAL_FLOOR}x of its floor: {'MET' if over <= GOAL_FLOOR else 'NOT MET'} ({over:.2f}x;"
        f" explain {s['optimized_explain_s'] / s['optimized_explain_floor_s']:.2f}x,"
        f" simulate {s['optimized_simulate_s'] / s['optimized_simulate_floor_s']:.2f}x)"
    )
    lines.append(
        f"\nLLM explanations the optimized path wrote exactly as today's (first rep): {same} of {written};"
        f" answers taken from a response cache: {hits}; simulated levels, largest difference between the paths:"
        f" {result.simulated_delta():.1e}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--units", type=int, default=4, help="units explained and simulated (both directions count)")
    parser.add_argument("--n-sequences", type=int, default=256, help="corpus sequences the units are captured on")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20, help="top records per unit (5 per split at 20)")
    parser.add_argument("--random-k", type=int, default=20, help="random records per unit")
    parser.add_argument("--samples", type=int, default=2, help="explanations per unit (explanations.samples)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of both paths")
    parser.add_argument("--batch-size", type=int, default=16, help="simulation batch size (sequences per pass)")
    parser.add_argument(
        "--batch-requests",
        type=int,
        default=DEFAULT_BATCH_REQUESTS,
        help="optimized path: units' requests generated together (the pipeline's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    subject = load_subject_model(args.model, device=args.device, dtype=args.dtype)
    layer = subject.n_layers // 2 if args.layer is None else args.layer
    spec = SamplingSpec(top_k=args.top_k, random_k=args.random_k)
    units = make_units(subject, layer, args.units, args.n_sequences, args.seq_len, spec)
    params = GenerationParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        n=args.samples,
        stop=("\n",),
        avoid=tuple(explainer_few_shot_explanations()),
    )
    corpus = tokenize_corpus(subject.tokenizer, CorpusSpec(n_sequences=32, seq_len=128))
    ids = torch.as_tensor(np.asarray(corpus["token_ids"].to_list(), dtype=np.int64), device=args.device)
    bare = ids.split(8)
    print(f"model: {subject.identity.data_version}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"workload: {len(units)} units of layer {layer} ({', '.join(f'{u.neuron}{u.polarity}' for u in units)});"
        f" explain: {args.samples} samples at temperature {args.temperature}, at most {args.max_tokens} tokens;"
        f" simulate: {sum(len(u.split('valid')) for u in units) / max(len(units), 1):.0f} valid sequences of"
        f" {args.seq_len} tokens per unit; bare forward: batches of 8 x 128 tokens"
    )
    result = measure(subject, units, params, args.reps, bare, args.batch_size, args.batch_requests)
    first = result.runs["optimized"][0]
    print(f"explanations simulated per rep: {first.simulations} (every candidate, chosen ones, controls)\n")
    print(format_report(result))


if __name__ == "__main__":
    main()

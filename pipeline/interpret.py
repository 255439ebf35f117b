"""Explain, simulate and score one layer's neurons: the paper's core loop, free of Dagster.

Inputs are the `top_k_examples` rows of a layer and the corpus tokens; outputs are plain frames,
one row per explanation (explanations, scores) or per held-out sequence (simulations). Nothing
raises for one neuron's trouble: a dead neuron, a failed request or an unusable completion
becomes a row with NULL values and a `failure_reason`, and the layer completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import polars as pl

from pipeline.baseline import TokenLookupSimulator, token_lookup_explanation
from pipeline.llm import Completion, GenerationParams, LLMBackend, LLMFailure
from pipeline.prompts import (
    EXPLAIN_CHAT_VERSION,
    EXPLAIN_VERSION,
    explanation_messages,
    explanation_prompt,
    parse_chat_explanation,
    parse_explanation,
)
from pipeline.scoring import NeuronScores, score_neuron
from pipeline.simulator import Simulator

LLM = "llm"
BASELINE = "token_lookup"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class HeldOut:
    record_kind: str  # "top" or "random"
    split_rank: int
    seq_id: int
    tokens: list[str]
    token_ids: list[int]
    acts: np.ndarray


@dataclass(frozen=True)
class NeuronExamples:
    layer: int
    neuron: int
    max_activation: float
    train: list[list[tuple[str, int]]]  # top train records as (token, level)
    held_out: list[HeldOut]  # valid top, then valid random
    top_tokens: list[dict]
    calibration: list[HeldOut] = field(default_factory=list)  # calibration top, then random

    @property
    def dead(self) -> bool:
        return not self.max_activation > 0


def neuron_examples(
    examples: pl.DataFrame, corpus_tokens: pl.DataFrame, train_records: int = 5
) -> dict[tuple[int, int], NeuronExamples]:
    """The explainer's records and the held-out scoring sequences of each (layer, neuron)."""
    tokens = {row["seq_id"]: row for row in corpus_tokens.select("seq_id", "tokens", "token_ids").iter_rows(named=True)}
    out: dict[tuple[int, int], NeuronExamples] = {}
    for row in examples.iter_rows(named=True):
        records = sorted(row["records"], key=lambda r: (r["kind"] != "top", r["split_rank"]))
        train = [
            list(zip(tokens[r["seq_id"]]["tokens"], r["levels"], strict=True))
            for r in records
            if r["kind"] == "top" and r["split"] == "train"
        ][:train_records]

        def split(name: str, records: list[dict] = records) -> list[HeldOut]:
            return [
                HeldOut(
                    r["kind"],
                    r["split_rank"],
                    r["seq_id"],
                    tokens[r["seq_id"]]["tokens"],
                    tokens[r["seq_id"]]["token_ids"],
                    np.asarray(r["acts"], dtype=np.float64),
                )
                for r in records
                if r["split"] == name
            ]

        key = (row["layer"], row["neuron"])
        out[key] = NeuronExamples(
            row["layer"],
            row["neuron"],
            float(row["max_activation"]),
            train,
            split("valid"),
            row["top_tokens"] or [],
            split("calibration"),
        )
    return out


def select_neurons(n_neurons: int, limit: int | None, ids: Sequence[int] | None) -> list[int]:
    """Explicit ids (checked), else the first `limit` neurons (all when limit is None)."""
    if ids:
        bad = [i for i in ids if not 0 <= i < n_neurons]
        if bad:
            raise ValueError(f"neuron ids {bad} out of range: the layer has {n_neurons} neurons")
        return sorted(set(ids))
    if limit is not None and limit < 1:
        raise ValueError(f"the number of neurons to explain must be at least 1, got {limit}")
    return list(range(n_neurons if limit is None else min(limit, n_neurons)))


EXPLANATION_SCHEMA = {
    "layer": pl.Int32,
    "neuron": pl.Int32,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "explanation": pl.String,
    "failure_reason": pl.String,
    "explainer_backend": pl.String,
    "explainer_model": pl.String,
    "prompt_version": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "cached": pl.Boolean,
}


def explain_layer(
    examples: Sequence[NeuronExamples],
    backend: LLMBackend,
    params: GenerationParams,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """`params.n` LLM explanations per neuron, plus the token-lookup baseline's one."""
    rows: list[dict] = []
    llm_lineage = {"explainer_backend": backend.backend, "explainer_model": backend.model}
    alive = [ex for ex in examples if not ex.dead]
    results: dict[tuple[int, int], Completion | LLMFailure] = {}
    step = max(1, backend.batch_hint)
    chat = backend.api == "chat"  # the same few-shot prompt as system/user/assistant turns
    prompt = explanation_messages if chat else explanation_prompt
    for lo in range(0, len(alive), step):
        chunk = alive[lo : lo + step]
        for ex, result in zip(chunk, backend.complete([prompt(e.train) for e in chunk], params), strict=True):
            results[(ex.layer, ex.neuron)] = result
        if progress is not None:
            progress(f"explained {min(lo + step, len(alive))}/{len(alive)} neurons")
    for ex in examples:
        base = {"layer": ex.layer, "neuron": ex.neuron}
        if ex.dead:
            rows.append(base | llm_lineage | {"kind": LLM, "sample_index": 0, "failure_reason": _DEAD})
        else:
            rows += _llm_rows(base | llm_lineage, results[(ex.layer, ex.neuron)], params.n, chat)
        text = token_lookup_explanation(ex.top_tokens)
        rows.append(
            base
            | {
                "kind": BASELINE,
                "sample_index": 0,
                "explanation": text,
                "failure_reason": None if text is not None else _DEAD,
                "explainer_backend": "baseline",
                "explainer_model": "token-lookup",
                "prompt_version": TokenLookupSimulator.prompt_version,
            }
        )
    return pl.DataFrame(rows, schema=EXPLANATION_SCHEMA)


_DEAD = "dead neuron: no activation above 0 in the corpus"


def _llm_rows(base: dict, result: Completion | LLMFailure, n: int, chat: bool = False) -> list[dict]:
    base = base | {"kind": LLM, "prompt_version": EXPLAIN_CHAT_VERSION if chat else EXPLAIN_VERSION}
    parse = parse_chat_explanation if chat else parse_explanation
    if isinstance(result, LLMFailure):
        reason = f"explainer request failed after {result.attempts} attempt(s): {result.reason}"
        return [base | {"sample_index": i, "failure_reason": reason} for i in range(n)]
    spent = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached": result.cached,
    }
    rows = []
    for i, completion in enumerate(result.texts):
        text, reason = parse(completion)
        if text is not None and i < len(result.truncated) and result.truncated[i]:
            text, reason = None, f"explanation cut off at max_tokens (raise explain.max_tokens): {text[:80]!r}"
        rows.append(base | spent | {"sample_index": i, "explanation": text, "failure_reason": reason})
    return rows


SIMULATION_SCHEMA = {
    "layer": pl.Int32,
    "neuron": pl.Int32,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "record_kind": pl.String,
    "split_rank": pl.Int16,
    "seq_id": pl.Int32,
    "true_acts": pl.List(pl.Float32),
    "simulated": pl.List(pl.Float32),
    "failure_reason": pl.String,
    "simulator_backend": pl.String,
    "simulator_model": pl.String,
    "prompt_version": pl.String,
}


def simulate_layer(
    explanations: pl.DataFrame,
    examples: dict[tuple[int, int], NeuronExamples],
    simulator: Simulator,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """One row per (explanation, held-out sequence); an explanation that cannot be simulated gets
    one row with NULL sequence fields and the reason."""
    rows: list[dict] = []
    for exp in explanations.sort("layer", "neuron", "kind", "sample_index").iter_rows(named=True):
        ex = examples[(exp["layer"], exp["neuron"])]
        base = {k: exp[k] for k in ("layer", "neuron", "kind", "sample_index")}
        sim: Simulator = (
            TokenLookupSimulator(ex.top_tokens, ex.max_activation) if exp["kind"] == BASELINE else simulator
        )
        lineage = {
            "simulator_backend": sim.backend,
            "simulator_model": sim.model,
            "prompt_version": sim.prompt_version,
        }
        if exp["explanation"] is None:
            rows.append(base | lineage | {"failure_reason": f"no explanation: {exp['failure_reason']}"})
            continue
        if isinstance(sim, TokenLookupSimulator):
            result: list[np.ndarray] | LLMFailure = sim.simulate_ids([h.token_ids for h in ex.held_out])
        else:
            result = sim.simulate_each(exp["explanation"], [h.tokens for h in ex.held_out])
        if isinstance(result, LLMFailure):
            rows.append(base | lineage | {"failure_reason": f"simulation failed: {result.reason}"})
            continue
        for held, simulated in zip(ex.held_out, result, strict=True):
            seq = {"record_kind": held.record_kind, "split_rank": held.split_rank, "seq_id": held.seq_id}
            if isinstance(simulated, LLMFailure):  # this sequence alone (a remote simulator asks per sequence)
                rows.append(base | lineage | seq | {"failure_reason": f"simulation failed: {simulated.reason}"})
                continue
            rows.append(
                base
                | lineage
                | seq
                | {"true_acts": held.acts.tolist(), "simulated": np.asarray(simulated, dtype=np.float64).tolist()}
            )
        if progress is not None:
            progress(f"simulated layer {exp['layer']} neuron {exp['neuron']} ({exp['kind']} #{exp['sample_index']})")
    return pl.DataFrame(rows, schema=SIMULATION_SCHEMA)


def score_layer(simulations: pl.DataFrame, max_activation: dict[tuple[int, int], float]) -> pl.DataFrame:
    """One row per explanation: the paper's scores over its held-out sequences, NULL + reason where
    a score is undefined or the explanation never got simulated."""
    rows: list[dict] = []
    keys = ["layer", "neuron", "kind", "sample_index"]
    for key, group in simulations.sort(*keys, "record_kind", "split_rank").group_by(keys, maintain_order=True):
        layer, neuron, kind, sample = key
        base = {"layer": layer, "neuron": neuron, "kind": kind, "sample_index": sample}
        lineage = {c: group[c][0] for c in ("simulator_backend", "simulator_model", "prompt_version")}
        done = group.filter(pl.col("simulated").is_not_null())
        if done.height == 0:
            rows.append(base | lineage | {"failure_reason": group["failure_reason"][0]})
            continue
        parts = {
            kind_: (
                [np.asarray(a) for a in part["true_acts"].to_list()],
                [np.asarray(s) for s in part["simulated"].to_list()],
            )
            for kind_ in ("top", "random")
            for part in [done.filter(pl.col("record_kind") == kind_)]
        }
        scores = score_neuron(*parts["top"], *parts["random"], max_activation[(layer, neuron)])
        rows.append(base | lineage | asdict(scores) | {"failure_reason": None})
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


SCORE_SCHEMA = {
    "layer": pl.Int32,
    "neuron": pl.Int32,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "simulator_backend": pl.String,
    "simulator_model": pl.String,
    "prompt_version": pl.String,
    **{
        f.name: (pl.Float64 if f.type.startswith("float") else pl.String if f.type.startswith("str") else pl.Int32)
        for f in fields(NeuronScores)
    },
    "failure_reason": pl.String,
}

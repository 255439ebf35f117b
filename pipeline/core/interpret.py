"""Explain, simulate and score one layer's units: the paper's core loop with its controls, free of Dagster.

Per unit the candidates are the LLM's samples and the token-space explanation (the unit's top
tokens as text), both judged by the same simulator, plus the exact token-lookup table as a
separately named reference. Then, as in the paper:
1. every usable candidate is simulated on the VALID split, and each kind's best is chosen there;
2. the chosen ones are simulated on the CALIBRATION split (to fit the linear calibration) and on
   the TEST split, whose score is the one reported;
3. the CONTROL: each chosen explanation of a unit is replaced by the chosen explanation of another
   unit of the layer (a fixed derangement) and simulated on the unit's own test sequences. A score
   means something only where it beats its control.

An LLM sample that copies a few-shot explanation is drawn again with other seeds (up to
REDRAW_ROUNDS times; `copies_redrawn` counts it); one that still copies, or that many units of the
layer got verbatim, is flagged degenerate and never chosen. Nothing raises for one unit's trouble: a dead unit, a failed
request or an unusable completion becomes a row with NULL values and a `failure_reason`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import polars as pl

from pipeline.core.baseline import TOKEN_SPACE_VERSION, TokenLookupSimulator, token_space_explanation
from pipeline.core.frames import column_docs, schema_of
from pipeline.core.llm import Completion, GenerationParams, LLMBackend, LLMFailure
from pipeline.core.progress import Progress
from pipeline.core.prompts import (
    EXPLAIN_CHAT_VERSION,
    EXPLAIN_VERSION,
    explanation_messages,
    explanation_prompt,
    few_shot_explanations,
    parse_chat_explanation,
    parse_explanation,
)
from pipeline.core.scoring import (
    Discrimination,
    SplitScores,
    correlation,
    discrimination,
    fit_calibration,
    score_split,
)
from pipeline.core.simulator import Job, JobResult, Simulator
from pipeline.core.units import UNIT_KEY, UNIT_SCHEMA, Example, Unit, UnitKey, derangement

LLM = "llm"  # explanations written by the explainer model
TOKEN_SPACE = "token_space"  # the unit's top tokens as text, judged by the same simulator (the paper's baseline)
TOKEN_LOOKUP = "token_lookup"  # reference: the top-token table as an exact lookup simulator
KINDS = (LLM, TOKEN_SPACE, TOKEN_LOOKUP)
CANDIDATE_KINDS = (LLM, TOKEN_SPACE)  # simulated by the simulator under test; a unit's best is one of these
DEAD = "dead unit: no activation in this direction in the corpus"

Log = Callable[[str], None]

EXPLANATION_KEY = [*UNIT_KEY, "kind", "sample_index"]


# ---------------------------------------------------------------- explanations

EXPLANATION_SCHEMA = {
    **UNIT_SCHEMA,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "explanation": pl.String,
    "failure_reason": pl.String,
    "degenerate_reason": pl.String,
    "explainer_backend": pl.String,
    "explainer_model": pl.String,
    "prompt_version": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "cached": pl.Boolean,
    # Appended column (pipeline.infra.warehouse.APPENDED_COLUMNS): how many times this LLM sample was drawn
    # again because it copied few-shot text.
    "copies_redrawn": pl.Int16,
}

REDRAW_ROUNDS = 2  # new seeds tried for an LLM sample that copies a few-shot explanation
REDRAW_SEED_STEP = 1_000_003  # round r asks with seed + r * step: distinct from any other request's seed


def explain_layer(
    units: Sequence[Unit], backend: LLMBackend, params: GenerationParams, log: Log | None = None
) -> pl.DataFrame:
    """`params.n` LLM explanations per unit, its token-space explanation and the lookup reference."""
    rows: list[dict] = []
    llm_lineage = {"explainer_backend": backend.backend, "explainer_model": backend.model}
    alive = [u for u in units if not u.dead]
    chat = backend.api == "chat"  # the same few-shot prompt as system/user/assistant turns
    prompt = explanation_messages if chat else explanation_prompt
    progress = Progress("explained units", len(alive), log)
    # Every unit's prompt in one call: a server backend keeps all of its slots busy across units.
    completions = backend.complete_each(
        [prompt(u.train_records()) for u in alive], params, on_result=lambda i, result: progress.step()
    )
    results: dict[UnitKey, Completion | LLMFailure] = {u.key: r for u, r in zip(alive, completions, strict=True)}
    redrawn = _redraw_copies(alive, results, backend, params, prompt, chat, log)
    for unit in units:
        base = {"layer": unit.layer, "neuron": unit.neuron, "polarity": unit.polarity}
        if unit.dead:
            rows.append(base | llm_lineage | {"kind": LLM, "sample_index": 0, "failure_reason": DEAD})
        else:
            rows += _llm_rows(base | llm_lineage, results[unit.key], chat, redrawn.get(unit.key))
        text = token_space_explanation(unit.top_tokens)
        common = base | {"sample_index": 0, "explanation": text, "failure_reason": None if text else DEAD}
        rows.append(
            common
            | {
                "kind": TOKEN_SPACE,
                "explainer_backend": "baseline",
                "explainer_model": "top-tokens",
                "prompt_version": TOKEN_SPACE_VERSION,
            }
        )
        rows.append(
            common
            | {
                "kind": TOKEN_LOOKUP,
                "explainer_backend": "baseline",
                "explainer_model": "token-lookup",
                "prompt_version": TokenLookupSimulator.prompt_version,
            }
        )
    return flag_degenerate(pl.DataFrame(rows, schema=EXPLANATION_SCHEMA))


def _copied_indices(result: Completion | LLMFailure, chat: bool, shots: set[str]) -> list[int]:
    """Which samples of a completion copy few-shot text."""
    if isinstance(result, LLMFailure):
        return []
    parse = parse_chat_explanation if chat else parse_explanation
    texts = (parse(t)[0] for t in result.texts)
    return [i for i, text in enumerate(texts) if text is not None and few_shot_copy(text, shots) is not None]


def _redraw_copies(
    alive: Sequence[Unit],
    results: dict[UnitKey, Completion | LLMFailure],
    backend: LLMBackend,
    params: GenerationParams,
    prompt: Callable,
    chat: bool,
    log: Log | None,
) -> dict[UnitKey, list[int]]:
    """Replaces, in `results`, the samples that copy few-shot text by fresh samples drawn with other
    seeds (cached like any request, so a rerun draws the same); returns per unit how many times each
    sample index was drawn again. A small explainer copies its examples now and then; resampling is
    best-of-N with the copy rejected, and the count says it happened."""
    shots = few_shot_set()
    redrawn: dict[UnitKey, list[int]] = {}
    for round_ in range(1, REDRAW_ROUNDS + 1):
        todo = [(u, idx) for u in alive if (idx := _copied_indices(results[u.key], chat, shots))]
        if not todo:
            break
        if log:
            n = sum(len(idx) for _, idx in todo)
            log(f"{n} explanation(s) of {len(todo)} unit(s) copy few-shot text: drawing again (round {round_})")
        again = backend.complete_each(
            [prompt(u.train_records()) for u, _ in todo], replace(params, seed=params.seed + round_ * REDRAW_SEED_STEP)
        )
        for (unit, idx), new in zip(todo, again, strict=True):
            old = results[unit.key]
            assert isinstance(old, Completion)
            counts = redrawn.setdefault(unit.key, [0] * len(old.texts))
            for i in idx:
                counts[i] += 1
            if isinstance(new, LLMFailure):
                continue
            copied = set(_copied_indices(new, chat, shots))
            fresh = [j for j in range(len(new.texts)) if j not in copied]
            texts, truncated = list(old.texts), list(old.truncated)
            for i in idx:
                if not fresh:
                    break
                j = fresh.pop(0)
                texts[i] = new.texts[j]
                if i < len(truncated):
                    truncated[i] = j < len(new.truncated) and new.truncated[j]
            results[unit.key] = Completion(
                texts=texts,
                prompt_tokens=old.prompt_tokens + new.prompt_tokens,
                completion_tokens=old.completion_tokens + new.completion_tokens,
                cached=old.cached and new.cached,
                truncated=tuple(truncated),
            )
    return redrawn


def _llm_rows(
    base: dict, result: Completion | LLMFailure, chat: bool = False, redrawn: Sequence[int] | None = None
) -> list[dict]:
    base = base | {"kind": LLM, "prompt_version": EXPLAIN_CHAT_VERSION if chat else EXPLAIN_VERSION}
    parse = parse_chat_explanation if chat else parse_explanation
    if isinstance(result, LLMFailure):
        reason = f"explainer request failed after {result.attempts} attempt(s): {result.reason}"
        return [base | {"sample_index": 0, "failure_reason": reason, "copies_redrawn": 0}]
    spent = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached": result.cached,
    }
    rows = []
    for i, completion in enumerate(result.texts):
        text, reason = parse(completion)
        if text is not None and i < len(result.truncated) and result.truncated[i]:
            text, reason = None, f"explanation cut off at max_tokens (raise explanations.max_tokens): {text[:80]!r}"
        again = redrawn[i] if redrawn is not None and i < len(redrawn) else 0
        rows.append(
            base | spent | {"sample_index": i, "explanation": text, "failure_reason": reason, "copies_redrawn": again}
        )
    return rows


def normalized(text: str) -> str:
    """Lowercase words only: how two explanations are compared for copying."""
    return " ".join(re.findall(r"\w+", text.lower()))


SHARED_SHARE = 0.25  # an explanation this share of a layer's units got verbatim (and at least 3) says nothing
SHARED_MIN_UNITS = 3


def few_shot_set(few_shot: Iterable[str] | None = None) -> set[str]:
    """The prompts' example explanations, normalized (default: every one the prompts show)."""
    return {normalized(s) for s in (few_shot if few_shot is not None else few_shot_explanations())} - {""}


def few_shot_copy(text: str, shots: set[str]) -> str | None:
    """The few-shot explanation (normalized) that `text` repeats, if any."""
    norm = normalized(text)
    return next((s for s in shots if s in norm), None)


def flag_degenerate(frame: pl.DataFrame, few_shot: Iterable[str] | None = None) -> pl.DataFrame:
    """Sets `degenerate_reason` on candidate explanations that repeat a few-shot explanation, or that
    a large share of their layer's units got verbatim: such text describes the prompt, not the unit."""
    shots = few_shot_set(few_shot)
    reasons: list[str | None] = []
    counts: dict[tuple[int, str, str], int] = {}
    units_per_layer: dict[tuple[int, str], int] = {}
    candidates = frame.filter(pl.col("kind").is_in(CANDIDATE_KINDS) & pl.col("explanation").is_not_null())
    for (layer, kind), group in candidates.group_by("layer", "kind"):
        units_per_layer[(layer, kind)] = group.select("neuron", "polarity").n_unique()
        for text, n in (
            group.with_columns(pl.col("explanation").map_elements(normalized, return_dtype=pl.String).alias("norm"))
            .group_by("norm")
            .agg(pl.struct("neuron", "polarity").n_unique().alias("n"))
            .iter_rows()
        ):
            counts[(layer, kind, text)] = n
    for row in frame.iter_rows(named=True):
        reason = None
        if row["kind"] in CANDIDATE_KINDS and row["explanation"] is not None:
            norm = normalized(row["explanation"])
            copied = few_shot_copy(norm, shots)
            shared = counts.get((row["layer"], row["kind"], norm), 0)
            total = units_per_layer.get((row["layer"], row["kind"]), 0)
            if copied is not None:
                reason = f"repeats the few-shot explanation {copied!r}"
            elif shared >= max(SHARED_MIN_UNITS, SHARED_SHARE * total):
                reason = f"the same explanation as {shared} of the layer's {total} units"
        reasons.append(reason)
    return frame.with_columns(pl.Series("degenerate_reason", reasons, dtype=pl.String))


# ---------------------------------------------------------------- simulations

SIMULATION_SCHEMA = {
    **UNIT_SCHEMA,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "split": pl.String,
    "control": pl.Boolean,  # simulated from another unit's explanation (the control) on this unit's sequences
    "control_neuron": pl.Int32,
    "control_polarity": pl.String,
    "control_sample_index": pl.Int16,
    "record_kind": pl.String,
    "split_rank": pl.Int16,
    "seq_id": pl.Int32,
    "true_acts": pl.List(pl.Float32),  # in the unit's direction (negated for '-')
    "simulated": pl.List(pl.Float32),  # expected level 0-10 per token
    "failure_reason": pl.String,
    "simulator_backend": pl.String,
    "simulator_model": pl.String,
    "prompt_version": pl.String,
}


@dataclass(frozen=True)
class Candidate:
    unit: Unit
    kind: str
    sample_index: int
    text: str


def candidates(explanations: pl.DataFrame, units: Mapping[UnitKey, Unit]) -> tuple[list[Candidate], list[dict]]:
    """(explanations to simulate, rows saying why the others are not simulated)."""
    usable: list[Candidate] = []
    skipped: list[dict] = []
    for exp in explanations.sort(EXPLANATION_KEY).iter_rows(named=True):
        unit = units[(exp["layer"], exp["neuron"], exp["polarity"])]
        key = {k: exp[k] for k in EXPLANATION_KEY}
        if exp["explanation"] is None:
            skipped.append(key | {"split": "valid", "failure_reason": f"no explanation: {exp['failure_reason']}"})
        elif exp.get("degenerate_reason"):
            skipped.append(key | {"split": "valid", "failure_reason": f"not simulated: {exp['degenerate_reason']}"})
        else:
            usable.append(Candidate(unit, exp["kind"], exp["sample_index"], exp["explanation"]))
    return usable, skipped


@dataclass(frozen=True)
class _Task:
    """A candidate's (or, as a control, another unit's) explanation to simulate on a unit's splits."""

    candidate: Candidate
    target: Unit
    splits: tuple[str, ...]
    control: Candidate | None = None


class _Runner:
    """Simulates candidates on splits of a unit and turns the results into rows."""

    def __init__(self, simulator: Simulator | None, log: Log | None):
        self.simulator = simulator
        self.log = log
        self.rows: list[dict] = []

    def _simulator(self, candidate: Candidate) -> Simulator:
        if candidate.kind == TOKEN_LOOKUP:
            return TokenLookupSimulator(candidate.unit.top_tokens, candidate.unit.max_activation)
        if self.simulator is None:
            raise ValueError(f"a {candidate.kind} explanation needs a simulator")
        return self.simulator

    def run(self, tasks: Sequence[_Task], what: str) -> None:
        """Every task's simulation. The simulator gets them in one `simulate_many` call, so a server
        simulator has the sequences of many units in flight at once (up to its concurrency limit)."""
        progress = Progress(what, len(tasks), self.log)
        remote: list[tuple[_Task, dict, list[Example]]] = []
        for task in tasks:
            source = task.control or task.candidate
            sim = self._simulator(source)  # a lookup control uses the other unit's table
            examples = [e for s in task.splits for e in task.target.split(s)]
            base = self._base(task, sim)
            if not examples:
                self.rows += [base | {"split": s, "failure_reason": f"no {s} examples"} for s in task.splits]
                progress.step()
            elif isinstance(sim, TokenLookupSimulator):
                self._add(task, base, examples, sim.simulate_ids([e.token_ids for e in examples]))
                progress.step()
            else:
                remote.append((task, base, examples))
        if remote:
            assert self.simulator is not None
            jobs = [Job((t.control or t.candidate).text, [list(e.tokens) for e in ex]) for t, _, ex in remote]
            results = self.simulator.simulate_many(jobs, on_result=lambda i, result: progress.step())
            for (task, base, examples), result in zip(remote, results, strict=True):
                self._add(task, base, examples, result)

    def _base(self, task: _Task, sim: Simulator) -> dict:
        target, candidate, control = task.target, task.candidate, task.control
        base = {
            "layer": target.layer,
            "neuron": target.neuron,
            "polarity": target.polarity,
            "kind": candidate.kind,
            "sample_index": candidate.sample_index,
            "control": control is not None,
            "simulator_backend": sim.backend,
            "simulator_model": sim.model,
            "prompt_version": sim.prompt_version,
        }
        if control is not None:
            base |= {
                "control_neuron": control.unit.neuron,
                "control_polarity": control.unit.polarity,
                "control_sample_index": control.sample_index,
            }
        return base

    def _add(self, task: _Task, base: dict, examples: Sequence[Example], result: JobResult | list[np.ndarray]) -> None:
        if isinstance(result, LLMFailure):
            reason = f"simulation failed: {result.reason}"
            self.rows += [base | {"split": s, "failure_reason": reason} for s in task.splits]
            return
        for example, simulated in zip(examples, result, strict=True):
            fields = base | _example_fields(task.target, example)
            if isinstance(simulated, LLMFailure):  # this sequence alone (a remote simulator asks per sequence)
                self.rows.append(fields | {"failure_reason": f"simulation failed: {simulated.reason}"})
            else:
                self.rows.append(fields | {"simulated": np.asarray(simulated).tolist()})


def _example_fields(unit: Unit, example: Example) -> dict:
    return {
        "split": example.split,
        "record_kind": example.kind,
        "split_rank": example.split_rank,
        "seq_id": example.seq_id,
        "true_acts": unit.true(example).tolist(),
    }


def simulate_layer(
    explanations: pl.DataFrame,
    units: Mapping[UnitKey, Unit],
    simulator: Simulator | None,
    log: Log | None = None,
) -> pl.DataFrame:
    """Valid split for every candidate; calibration + test for each kind's chosen one; the control
    on test. One row per (explanation, split, control, sequence); a failure is one NULL row per split."""
    usable, skipped = candidates(explanations, units)
    runner = _Runner(simulator, log)
    runner.rows += skipped
    runner.run([_Task(c, c.unit, ("valid",)) for c in usable], "simulated explanations on the valid split")
    valid = {
        (r["layer"], r["neuron"], r["polarity"], r["kind"], r["sample_index"]): r
        for r in _scores(pl.DataFrame(runner.rows, schema=SIMULATION_SCHEMA)).iter_rows(named=True)
    }
    chosen = choose(usable, valid)
    controls = {kind: derangement(key for (key, k) in chosen if k == kind) for kind in KINDS}
    tasks = [_Task(c, c.unit, ("calibration", "test")) for c in chosen.values()]
    tasks += [
        _Task(c, c.unit, ("test",), chosen[(controls[c.kind][key], c.kind)])
        for (key, kind), c in chosen.items()
        if key in controls[kind]
    ]
    runner.run(tasks, "simulated chosen explanations and controls")
    order = [*EXPLANATION_KEY, "control", "split", "record_kind", "split_rank"]
    return pl.DataFrame(runner.rows, schema=SIMULATION_SCHEMA).sort(
        order, descending=[c == "record_kind" for c in order], nulls_last=True
    )


def choose(usable: Sequence[Candidate], valid: Mapping[tuple, Mapping]) -> dict[tuple[UnitKey, str], Candidate]:
    """Per (unit, kind): the candidate with the best valid-split correlation; where none has one,
    the first simulated without failure."""
    best: dict[tuple[UnitKey, str], tuple[tuple, Candidate]] = {}
    for cand in usable:
        score = valid.get((*cand.unit.key, cand.kind, cand.sample_index), {})
        if score.get("failure_reason") is not None:
            continue
        corr = score.get("corr_all")
        rank = (0 if corr is not None else 1, -(corr or 0.0), cand.sample_index)
        slot = (cand.unit.key, cand.kind)
        if slot not in best or rank < best[slot][0]:
            best[slot] = (rank, cand)
    return {slot: cand for slot, (_, cand) in best.items()}


# ---------------------------------------------------------------- scores

SCORE_SCHEMA = {
    **UNIT_SCHEMA,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "split": pl.String,  # 'valid' (where candidates are chosen) or 'test' (what is reported)
    "selected": pl.Boolean,  # the candidate chosen for its kind on the valid split
    "best": pl.Boolean,  # the unit's chosen explanation across kinds: its test row is THE score
    **schema_of(SplitScores),
    "calibration_slope": pl.Float64,
    "calibration_intercept": pl.Float64,
    "calibration_reason": pl.String,
    "control_neuron": pl.Int32,
    "control_polarity": pl.String,
    "control_corr_all": pl.Float64,
    "control_reason": pl.String,
    "gap": pl.Float64,  # corr_all - control_corr_all: what the explanation adds over another unit's
    "failure_reason": pl.String,
    "simulator_backend": pl.String,
    "simulator_model": pl.String,
    "prompt_version": pl.String,
}
SCORE_KEY = [*EXPLANATION_KEY, "split"]
# What the score columns mean, for the Dagster UI's column schema (the names map to the paper's).
SCORE_COLUMN_DOCS = {
    "split": "'valid' (where each kind's explanation is chosen) or 'test' (what is reported)",
    "selected": "the explanation chosen for its kind on the valid split",
    "best": "the unit's chosen explanation across kinds: its test row is THE score",
    **column_docs(SplitScores),
    "calibration_slope": "activation = slope * level + intercept, fitted on the calibration split",
    "calibration_intercept": "see calibration_slope",
    "calibration_reason": "why the simulation was not calibrated (NULL when it was)",
    "control_neuron": "the control: another unit's explanation simulated on this unit's sequences",
    "control_corr_all": "the control's corr_all: what an unrelated explanation scores here",
    "gap": "corr_all - control_corr_all: what the explanation adds over another unit's",
}
NOT_CALIBRATED = "not calibrated: only each kind's chosen explanation is simulated on the calibration split"


def _arrays(frame: pl.DataFrame, column: str) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in frame[column].to_list()]


def _scores(simulations: pl.DataFrame) -> pl.DataFrame:
    """Scores of each (explanation, split) from its own simulations, with calibration and control."""
    rows: list[dict] = []
    order = [*EXPLANATION_KEY, "split", "record_kind", "split_rank"]
    sims = simulations.sort(order, descending=[c == "record_kind" for c in order], nulls_last=True)
    for key, group in sims.group_by(EXPLANATION_KEY, maintain_order=True):
        base = dict(zip(EXPLANATION_KEY, key, strict=True))
        own, ctrl = group.filter(~pl.col("control").fill_null(False)), group.filter(pl.col("control").fill_null(False))
        selected = own.filter(pl.col("split").is_in(["calibration", "test"])).height > 0
        cal_rows = own.filter((pl.col("split") == "calibration") & pl.col("simulated").is_not_null())
        if cal_rows.height:
            calibration = fit_calibration(_arrays(cal_rows, "simulated"), _arrays(cal_rows, "true_acts"))
        else:
            failed = own.filter(pl.col("split") == "calibration")["failure_reason"].drop_nulls()
            calibration = failed[0] if len(failed) else NOT_CALIBRATED
        for split in ("valid", "test"):
            part = own.filter(pl.col("split") == split)
            if part.height == 0:
                continue
            lineage = {c: part[c][0] for c in ("simulator_backend", "simulator_model", "prompt_version")}
            row = base | lineage | {"split": split, "selected": selected}
            if not isinstance(calibration, str):
                row |= {
                    "calibration_slope": calibration.slope,
                    "calibration_intercept": calibration.intercept,
                    "calibration_reason": calibration.reason,
                }
            else:
                row["calibration_reason"] = calibration
            done = part.filter(pl.col("simulated").is_not_null())
            if done.height == 0:
                rows.append(row | {"failure_reason": part["failure_reason"][0]})
                continue
            if done.height < part.height:  # a remote simulator failed some sequences alone: say so beside the score
                first = part.filter(pl.col("simulated").is_null())["failure_reason"][0]
                row["failure_reason"] = f"scored on {done.height} of {part.height} sequences; {first}"
            top, rnd = (done.filter(pl.col("record_kind") == k) for k in ("top", "random"))
            scores = score_split(
                _arrays(top, "true_acts"), _arrays(top, "simulated"),
                _arrays(rnd, "true_acts"), _arrays(rnd, "simulated"), calibration,
            )  # fmt: skip
            row |= asdict(scores)
            control = ctrl.filter(pl.col("split") == split)
            if control.height:
                row |= {
                    "control_neuron": control["control_neuron"][0],
                    "control_polarity": control["control_polarity"][0],
                }
                cdone = control.filter(pl.col("simulated").is_not_null())
                if cdone.height:
                    c = correlation(_arrays(cdone, "true_acts"), _arrays(cdone, "simulated"))
                    row |= {"control_corr_all": c.value, "control_reason": c.reason}
                else:
                    row["control_reason"] = control["failure_reason"][0]
            elif split == "test":
                row["control_reason"] = "no other unit of the layer has an explanation of this kind to swap in"
            else:
                row["control_reason"] = "controls are simulated on the test split"
            if row.get("corr_all") is not None and row.get("control_corr_all") is not None:
                row["gap"] = row["corr_all"] - row["control_corr_all"]
            rows.append(row)
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def score_layer(simulations: pl.DataFrame) -> pl.DataFrame:
    """One row per (explanation, split): the paper's scores, the calibration, the control and the
    gap; `best` marks each unit's chosen explanation (best valid correlation among the kinds'
    chosen candidates), whose TEST row is the unit's reported score."""
    frame = _scores(simulations)
    valid = frame.filter(
        (pl.col("split") == "valid") & pl.col("selected") & pl.col("kind").is_in(CANDIDATE_KINDS)
    ).with_columns(pl.col("kind").replace_strict({k: i for i, k in enumerate(KINDS)}, return_dtype=pl.Int8).alias("k"))
    winners = (
        valid.sort(["corr_all", "k", "sample_index"], descending=[True, False, False], nulls_last=True)
        .unique(["layer", "neuron", "polarity"], keep="first", maintain_order=True)
        .select(*EXPLANATION_KEY, pl.lit(True).alias("best_"))
    )
    return (
        frame.join(winners, on=EXPLANATION_KEY, how="left", nulls_equal=True)
        .with_columns(pl.col("best_").fill_null(False).alias("best"))
        .drop("best_")
        .select(SCORE_SCHEMA.keys())
        .sort(SCORE_KEY, descending=[c == "split" for c in SCORE_KEY], nulls_last=True)
    )


def layer_discrimination(scores: pl.DataFrame, layer: int, kind: str | None = None) -> Discrimination:
    """The control check over a layer's units: each unit's reported (best) test score against its
    control; with `kind`, over that kind's chosen explanations instead."""
    rows = scores.filter(
        (pl.col("layer") == layer)
        & (pl.col("split") == "test")
        & (pl.col("best") if kind is None else (pl.col("selected") & (pl.col("kind") == kind)))
        & pl.col("corr_all").is_not_null()
        & pl.col("control_corr_all").is_not_null()
    )
    return discrimination(rows["corr_all"].to_list(), rows["control_corr_all"].to_list())

"""Detection and fuzzing: two cheap scorers any chat model can run (as in EleutherAI's delphi).

Both show the scorer model an explanation and several held-out texts per prompt, and the model
answers a list of 0/1 labels, one per text:
- DETECTION: does the unit respond to anything in this text? Half the texts activate it, half do not.
- FUZZING: are the marked tokens (between << and >>) the ones the unit responds to? Every text
  activates the unit; half mark its activating tokens, half mark as many other tokens of it.
Neither needs prompt logprobs. Where the backend gives label probabilities (in-process logits, or a
server's top logprobs), AUC is computed from P("1") / (P("0") + P("1")) at each label.

Held-out data. A unit's QUANTILE samples (activation_records' per-direction list: `quantile` for
'+', `quantile_neg` for '-'), a uniform sample binned by activation level, become examples of kind
'quantile' on the 'test' split (`with_quantiles`). Of those, sequences that are any of the unit's
top records, or a train/calibration random record (what the explainer and the token-space
explanation read), are dropped. A text ACTIVATES the unit when its strongest token reaches
`activating_level` on the 0-10 scale. Texts are windows of `window` tokens (a dense unit, such as
most of a gated MLP's, reaches level 1 somewhere in almost every 64-token sequence, so whole
sequences leave no negatives). Positives are the activating quantile samples, spread evenly over
their activation range, each cut to the window around its strongest token; a unit none of whose
quantile samples activates (its activity outside its top records stays below level 1) takes its
held-out top records instead (valid/calibration/test splits: never shown to the explainer).
Negatives are as many non-activating windows of the other held-out sequences (the quantile samples
and the unit's valid/test random records), one per sequence before a second of any. Counts are
equal, so chance is 0.5 balanced accuracy.

The control: each unit's chosen explanation is scored beside the chosen explanation of another
unit of the layer (the fixed derangement of `pipeline.core.units`), on the SAME prompts.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.frames import Float64, Int32, Str, schema_of
from pipeline.core.llm import LLMFailure, Usage
from pipeline.core.progress import Progress
from pipeline.core.prompts import EXPLANATION_ENDING, format_token
from pipeline.core.records import record_acts
from pipeline.core.scoring import Discrimination, discrimination
from pipeline.core.units import NEGATIVE, POSITIVE, UNIT_KEY, UNIT_SCHEMA, Example, Unit, UnitKey, derangement

DETECTION, FUZZING = "detection", "fuzzing"
SCORERS = (DETECTION, FUZZING)
QUANTILE = "quantile"  # Example.kind of a held-out quantile sample
QUANTILE_LISTS = {POSITIVE: "quantile", NEGATIVE: "quantile_neg"}  # activation_records' list per direction
CLASSIFY_VERSION = "classify-v1"  # completion-style prompt (base models, in-process and completions servers)
CLASSIFY_CHAT_VERSION = "classify-chat-v1"
MARK_OPEN, MARK_CLOSE = "<<", ">>"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ClassifySpec:
    scorers: tuple[str, ...] = SCORERS
    per_prompt: int = 5  # texts per prompt
    max_per_class: int = 10  # activating (and as many non-activating) texts per unit
    activating_level: int = 1  # a text activates the unit where a token reaches this 0-10 level
    seed: int = 0
    window: int = 16  # tokens per text shown (a longer held-out sequence is cut to windows)

    def validate(self) -> None:
        from pipeline.core.errors import AtlasInputError

        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise AtlasInputError(f"unknown scorers {bad}: choose from {', '.join(SCORERS)}")
        if self.per_prompt < 1 or self.max_per_class < 1:
            raise AtlasInputError("examples_per_prompt and max_per_class must be at least 1")
        if self.window < 2:
            raise AtlasInputError(f"window must be at least 2 tokens, got {self.window}")
        if not 1 <= self.activating_level <= 10:
            raise AtlasInputError(f"activating_level must be between 1 and 10, got {self.activating_level}")


# ---------------------------------------------------------------- held-out examples


def with_quantiles(
    units: Mapping[UnitKey, Unit], activation_records: pl.DataFrame, corpus_tokens: pl.DataFrame
) -> dict[UnitKey, Unit]:
    """Each unit with its direction's quantile samples added as examples of kind 'quantile' on the
    'test' split (split_rank = the sample's rank). A direction whose list is missing from
    activation_records (e.g. `quantile_neg` before signed capture) gets none."""
    neurons = pl.DataFrame(
        sorted({(layer, neuron) for layer, neuron, _ in units}),
        schema={"layer": pl.Int32, "neuron": pl.Int32},
        orient="row",
    )
    chosen = activation_records.join(neurons, on=["layer", "neuron"], how="semi")
    samples: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in record_acts(chosen, sorted(set(QUANTILE_LISTS.values()))).iter_rows(named=True):
        samples.setdefault((r["layer"], r["neuron"], r["kind"]), []).append(r)
    seqs = {int(s["seq_id"]) for recs in samples.values() for s in recs}
    tokens = {
        row["seq_id"]: (tuple(row["tokens"]), tuple(row["token_ids"]))
        for row in corpus_tokens.select("seq_id", "tokens", "token_ids")
        .filter(pl.col("seq_id").is_in(sorted(seqs)))
        .iter_rows(named=True)
    }
    out: dict[UnitKey, Unit] = {}
    for key, unit in units.items():
        extra = tuple(
            Example(QUANTILE, "test", int(s["rank"]), int(s["seq_id"]), *tokens[int(s["seq_id"])],
                    np.asarray(s["acts"], dtype=np.float32))
            for s in samples.get((unit.layer, unit.neuron, QUANTILE_LISTS[unit.polarity]), [])
        )  # fmt: skip
        out[key] = dataclasses.replace(unit, examples=unit.examples + extra)
    return out


@dataclass(frozen=True)
class HeldOut:
    """A unit's classification texts (windows, see the module doc): activating ones (up to
    `max_per_class`, spread over their activation range, weakest first) and non-activating ones (in a
    seeded order, one per sequence before a second of any)."""

    activating: list[Example]
    quiet: list[Example]


def _rng(seed: int, unit: Unit, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, unit.layer, unit.neuron, int(unit.polarity == NEGATIVE), salt])


def _spread(ordered: Sequence[Example], n: int) -> list[Example]:
    """n of them evenly spaced over the order (all when n >= len)."""
    if n >= len(ordered):
        return list(ordered)
    return [ordered[i] for i in np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))]


def held_out(unit: Unit, spec: ClassifySpec) -> HeldOut:
    """The unit's held-out texts (see the module doc): never a top record's sequence, nor a
    train/calibration random record's."""
    seen = {e.seq_id for e in unit.examples if e.kind == "top"}
    seen |= {e.seq_id for e in unit.examples if e.kind == "random" and e.split in ("train", "calibration")}
    pool: dict[int, Example] = {}
    for e in unit.examples:
        if e.seq_id in seen or e.seq_id in pool or not e.tokens:
            continue
        if e.kind == QUANTILE or (e.kind == "random" and e.split in ("valid", "test")):
            pool[e.seq_id] = e
    level = spec.activating_level
    activates = [e for e in pool.values() if e.kind == QUANTILE and unit.levels(e).max() >= level]
    if not activates:  # nothing outside the top records activates: the ones the explainer never saw
        activates = [e for e in unit.examples if e.kind == "top" and e.split != "train" and e.tokens]
        activates = [e for e in activates if unit.levels(e).max() >= level]
    ordered = sorted(activates, key=lambda e: (float(unit.true(e).max()), e.seq_id))
    chosen = _spread(ordered, spec.max_per_class)
    activating = [_around_peak(unit, e, spec.window) for e in chosen]
    used = {e.seq_id for e in chosen}
    rng = _rng(spec.seed, unit)
    per_sequence: list[list[Example]] = []
    for seq_id in sorted(s for s in pool if s not in used):
        e = pool[seq_id]
        quiet = [w for w in _windows(e, spec.window) if unit.levels(w).max() < level]
        per_sequence.append([quiet[i] for i in rng.permutation(len(quiet))])
    per_sequence = [per_sequence[i] for i in rng.permutation(len(per_sequence))]
    rounds = max((len(q) for q in per_sequence), default=0)
    return HeldOut(activating, [q[k] for k in range(rounds) for q in per_sequence if k < len(q)])


def _windows(e: Example, width: int) -> list[Example]:
    """The sequence cut into consecutive windows of `width` tokens (the whole of a shorter one; a
    short tail joins the window before it only where that is the whole sequence)."""
    n = len(e.tokens)
    if n <= width:
        return [e]
    return [e.window(start, width) for start in range(0, n - width + 1, width)]


def _around_peak(unit: Unit, e: Example, width: int) -> Example:
    """The window of `width` tokens with the unit's strongest token of the sequence in its middle."""
    n = len(e.tokens)
    if n <= width:
        return e
    peak = int(np.argmax(unit.true(e)))
    return e.window(min(max(0, peak - width // 2), n - width), width)


# ---------------------------------------------------------------- what a prompt shows


@dataclass(frozen=True)
class Shown:
    """One text of a prompt: its tokens and, for fuzzing, which of them are marked."""

    tokens: tuple[str, ...]
    marked: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class Item:
    shown: Shown
    label: int  # the right answer: 1 (activates / correctly marked) or 0
    seq_id: int
    start: int = 0  # the text's first token in the sequence


def fuzz_marks(unit: Unit, example: Example, level: int, rng: np.random.Generator) -> tuple[tuple[bool, ...], ...]:
    """(its activating tokens marked, as many other tokens marked at random), or () where the
    text has no token that does not activate (no wrong marking is possible)."""
    active = unit.levels(example) >= level
    others = np.flatnonzero(~active)
    if not active.any() or others.size == 0:
        return ()
    wrong = np.zeros_like(active)
    wrong[rng.choice(others, size=min(int(active.sum()), others.size), replace=False)] = True
    return tuple(bool(v) for v in active), tuple(bool(v) for v in wrong)


def items(unit: Unit, data: HeldOut, scorer: str, spec: ClassifySpec) -> tuple[list[Item], str | None]:
    """The labelled texts of one scorer in a seeded order, or why there are none. Detection: n
    activating texts (spread over their range) and n non-activating ones, n as large as both allow.
    Fuzzing: every activating text twice, rightly and wrongly marked."""
    out: list[Item] = []
    if scorer == DETECTION:
        n = min(len(data.activating), len(data.quiet))
        if n == 0:
            return [], (
                f"no held-out pairs: {len(data.activating)} activating text(s), {len(data.quiet)} non-activating"
                f" window(s) of {spec.window} tokens outside the unit's top and train/calibration records"
            )
        out += [Item(Shown(e.tokens), 1, e.seq_id, e.start) for e in _spread(data.activating, n)]
        out += [Item(Shown(e.tokens), 0, e.seq_id, e.start) for e in data.quiet[:n]]
    else:
        rng = _rng(spec.seed, unit, 1)
        for e in data.activating:
            marks = fuzz_marks(unit, e, spec.activating_level, rng)
            if marks:
                out += [
                    Item(Shown(e.tokens, marks[0]), 1, e.seq_id, e.start),
                    Item(Shown(e.tokens, marks[1]), 0, e.seq_id, e.start),
                ]
        if not out:
            return [], (
                f"nothing to mark: {len(data.activating)} held-out activating text(s), none with a token"
                " that does not activate"
            )
    order = _rng(spec.seed, unit, 2 + SCORERS.index(scorer)).permutation(len(out))
    return [out[i] for i in order], None


def pack(shuffled: Sequence[Item], per_prompt: int) -> list[list[Item]]:
    """Prompts of up to `per_prompt` texts in the given order, where no prompt shows one sequence
    twice (fuzzing's right and wrong markings of a text go to different prompts)."""
    queue = list(shuffled)
    prompts: list[list[Item]] = []
    while queue:
        current: list[Item] = []
        seqs: set[int] = set()
        rest = []
        for item in queue:
            if len(current) < per_prompt and item.seq_id not in seqs:
                current.append(item)
                seqs.add(item.seq_id)
            else:
                rest.append(item)
        prompts.append(current)
        queue = rest
    return prompts


# ---------------------------------------------------------------- prompts

_HEADER = (
    "We are studying neurons in a language model. A neuron reads a text one token at a time and responds to "
    "some of the tokens. Each neuron comes with a short description of what it responds to."
)
_TASK = {
    DETECTION: " Below, numbered texts are followed by a neuron's description. For each text, decide from the "
    "description whether the neuron responds to anything in it: 1 if it does, 0 if it does not.",
    FUZZING: f" Below, numbered texts are followed by a neuron's description. In each text some tokens are marked "
    f"between {MARK_OPEN} and {MARK_CLOSE}. For each text, decide from the description whether the marked tokens "
    "are the ones the neuron responds to: 1 if they are, 0 if they are other tokens.",
}
_ANSWER = " The answer lists one 1 or 0 per text, in order."
_DEMO_EXPLANATION = 'words for animals, such as " dog" and " horse"'
_DEMO = {
    DETECTION: (
        [(Shown(("Prices", " rose", " again", " in", " March", ".")), 0),
         (Shown(("The", " dog", " barked", " at", " the", " mailman", ".")), 1),
         (Shown(("She", " rode", " her", " horse", " to", " town", ".")), 1),
         (Shown(("We", " met", " after", " the", " lecture", ".")), 0)]
    ),
    FUZZING: (
        [(Shown(("The", " dog", " barked", " at", " the", " mailman", "."), (0, 1, 0, 0, 0, 0, 0)), 1),
         (Shown(("She", " rode", " her", " horse", " to", " town", "."), (0, 0, 0, 0, 1, 0, 0)), 0),
         (Shown(("The", " farmer", " fed", " the", " cows", "."), (0, 1, 0, 0, 0, 0)), 0),
         (Shown(("A", " cat", " slept", " by", " the", " fire", "."), (0, 1, 0, 0, 0, 0, 0)), 1)]
    ),
}  # fmt: skip


def render(shown: Shown) -> str:
    """The text as the model reads it: tokens joined (escaped so it stays on one line), marked runs
    between << and >>."""
    out: list[str] = []
    marked = shown.marked or (False,) * len(shown.tokens)
    for i, (token, mark) in enumerate(zip(shown.tokens, marked, strict=True)):
        if mark and (i == 0 or not marked[i - 1]):
            out.append(MARK_OPEN)
        out.append(format_token(token))
        if mark and (i + 1 == len(marked) or not marked[i + 1]):
            out.append(MARK_CLOSE)
    return "".join(out)


def _description(explanation: str) -> str:
    return f"Description: {EXPLANATION_ENDING} {explanation}.\n"


def _texts(shown: Sequence[Shown]) -> str:
    return "".join(f"Text {i}: {render(s)}\n" for i, s in enumerate(shown, 1))


def answer_text(labels: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in labels) + "]"


def classification_prompt_parts(scorer: str, explanation: str, shown: Sequence[Shown]) -> tuple[str, str]:
    """Completion style, as (the part every explanation shares: instructions, a worked example and
    the texts; the explanation's own part, ending at 'Answer: ['). The texts come before the
    description, so a unit's explanation and its control share all work on the texts."""
    demo = _DEMO[scorer]
    shared = (
        _HEADER + _TASK[scorer] + _ANSWER + "\n\n"
        + _texts([s for s, _ in demo]) + _description(_DEMO_EXPLANATION)
        + "Answer: " + answer_text([label for _, label in demo]) + "\n\n" + _texts(shown)
    )  # fmt: skip
    return shared, _description(explanation) + "Answer: ["


def classification_prompt(scorer: str, explanation: str, shown: Sequence[Shown]) -> str:
    return "".join(classification_prompt_parts(scorer, explanation, shown))


def _chat_user(explanation: str, shown: Sequence[Shown]) -> str:
    return f"{_texts(shown)}{_description(explanation)}There are {len(shown)} texts: answer with {len(shown)} labels."


def classification_messages(scorer: str, explanation: str, shown: Sequence[Shown]) -> list[dict]:
    """Chat style: the instructions as the system turn, the worked example as a user/assistant pair."""
    demo = _DEMO[scorer]
    system = _HEADER + _TASK[scorer] + _ANSWER + " Reply with the list only, in the form [1, 0, ...]."
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _chat_user(_DEMO_EXPLANATION, [s for s, _ in demo])},
        {"role": "assistant", "content": answer_text([label for _, label in demo])},
        {"role": "user", "content": _chat_user(explanation, shown)},
    ]


# ---------------------------------------------------------------- the scorer model


@dataclass(frozen=True)
class Answer:
    """One prompt's answer: a label per text (None where unreadable), P(label 1) per text where
    the backend gives probabilities, and the tokens the prompt and answer took."""

    labels: list[int | None]
    probabilities: list[float | None] | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    problem: str | None = None  # an answer that arrived but could not be read (labels all None)

    def record(self) -> dict:
        return {
            "labels": self.labels,
            "probabilities": self.probabilities,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }

    @classmethod
    def from_record(cls, record: dict, cached: bool = False) -> Answer:
        return cls(record["labels"], record["probabilities"], record["prompt_tokens"], record["completion_tokens"],
                   cached)  # fmt: skip


class Classifier(ABC):
    """Answers classification prompts; `backend`, `model` and `prompt_version` name it in lineage."""

    backend: str
    model: str
    prompt_version: str

    @property
    def usage(self) -> Usage:
        if "_usage" not in self.__dict__:
            self.__dict__["_usage"] = Usage()
        return self.__dict__["_usage"]

    @abstractmethod
    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        """One answer per prompt, in order; each lists one label per text shown."""

    def classify_each(
        self, scorer: str, explanations: Sequence[str], prompts: Sequence[Sequence[Shown]]
    ) -> list[list[Answer | LLMFailure]]:
        """Several explanations on the same prompts (a unit's and its control's), one list per
        explanation; a backend that can share the work on the texts overrides this."""
        return [self.classify(scorer, explanation, prompts) for explanation in explanations]


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class ClassScores:
    n_examples: Int32
    n_positive: Int32
    n_negative: Int32
    n_answered: Int32
    accuracy: Float64 | None
    accuracy_reason: Str | None
    balanced_accuracy: Float64 | None
    balanced_accuracy_reason: Str | None
    f1: Float64 | None
    f1_reason: Str | None
    auc: Float64 | None
    auc_reason: Str | None


def auc_score(truth: Sequence[int], scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney)."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    ranks = pl.Series(s).rank("average").to_numpy()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def class_scores(
    truth: Sequence[int], predicted: Sequence[int | None], probabilities: Sequence[float | None] | None
) -> ClassScores:
    """Accuracy, balanced accuracy, F1 (of label 1) and AUC over the answered texts; None with a
    reason where undefined."""
    truth = [int(v) for v in truth]
    answered = [i for i, p in enumerate(predicted) if p is not None]
    t = np.array([truth[i] for i in answered], dtype=int)
    p = np.array([predicted[i] for i in answered], dtype=int)
    n_pos, n_neg = sum(truth), len(truth) - sum(truth)
    tp, tn = int(((t == 1) & (p == 1)).sum()), int(((t == 0) & (p == 0)).sum())
    fp, fn = int(((t == 0) & (p == 1)).sum()), int(((t == 1) & (p == 0)).sum())
    acc = bal = f1 = auc = None
    acc_r = bal_r = f1_r = auc_r = None
    if not answered:
        acc_r = bal_r = f1_r = auc_r = "no answered texts"
    else:
        acc = (tp + tn) / len(answered)
        if tp + fn and tn + fp:
            bal = (tp / (tp + fn) + tn / (tn + fp)) / 2
        else:
            bal_r = "the answered texts hold one class only"
        if 2 * tp + fp + fn:
            f1 = 2 * tp / (2 * tp + fp + fn)
        else:
            f1_r = "no positive texts and none answered 1"
        if probabilities is None:
            auc_r = "no label probabilities (the backend returned no logprobs)"
        else:
            scored = [i for i in answered if probabilities[i] is not None]
            ts = [truth[i] for i in scored]
            if not scored:
                auc_r = "no label probabilities among the answers"
            elif not (0 < sum(ts) < len(ts)):
                auc_r = "the texts with label probabilities hold one class only"
            else:
                auc = auc_score(ts, [float(probabilities[i]) for i in scored])  # type: ignore[arg-type]
                if len(scored) < len(answered):
                    auc_r = f"from {len(scored)} of {len(answered)} answers (the others had no label probabilities)"
    return ClassScores(len(truth), n_pos, n_neg, len(answered), acc, acc_r, bal, bal_r, f1, f1_r, auc, auc_r)


# ---------------------------------------------------------------- a layer

CLASSIFICATION_SCHEMA = {
    **UNIT_SCHEMA,
    "scorer": pl.String,  # 'detection' or 'fuzzing'
    "kind": pl.String,  # the scored explanation: the unit's best (chosen on valid) in `scores`
    "sample_index": pl.Int16,
    **schema_of(ClassScores),
    "control_neuron": pl.Int32,
    "control_polarity": pl.String,
    "control_kind": pl.String,
    "control_sample_index": pl.Int16,
    "control_accuracy": pl.Float64,
    "control_balanced_accuracy": pl.Float64,
    "control_auc": pl.Float64,
    "control_reason": pl.String,
    "gap": pl.Float64,  # balanced_accuracy - control_balanced_accuracy
    "auc_gap": pl.Float64,
    "seq_ids": pl.List(pl.Int32),  # per text shown, in prompt order
    "starts": pl.List(pl.Int16),  # per text: its first token in the sequence (texts are windows)
    "marked": pl.List(pl.List(pl.Int16)),  # fuzzing: positions marked in each text
    "labels": pl.List(pl.Int8),  # the right answers
    "predicted": pl.List(pl.Int8),
    "probability": pl.List(pl.Float64),  # P(label 1), where the backend gave it
    "control_predicted": pl.List(pl.Int8),
    "control_probability": pl.List(pl.Float64),
    "n_prompts": pl.Int32,
    "prompt_tokens": pl.Int64,  # this explanation's prompts (the control's are counted apart)
    "completion_tokens": pl.Int64,
    "control_prompt_tokens": pl.Int64,
    "control_completion_tokens": pl.Int64,
    "failure_reason": pl.String,
    "scorer_backend": pl.String,
    "scorer_model": pl.String,
    "prompt_version": pl.String,
}
CLASSIFICATION_KEY = [*UNIT_KEY, "scorer"]
NO_CONTROL = "no other unit of the layer has a chosen explanation to swap in"


@dataclass
class _Run:
    labels: list[int]
    predicted: list[int | None]
    probability: list[float | None] | None
    prompt_tokens: int
    completion_tokens: int
    failure: str | None


def _ask(classifier: Classifier, scorer: str, texts: Sequence[str], prompts: list[list[Item]]) -> list[_Run]:
    """Each explanation's answers on the same prompts, read into labels, probabilities and spent tokens."""
    labels = [i.label for p in prompts for i in p]
    runs = []
    for answers in classifier.classify_each(scorer, texts, [[i.shown for i in p] for p in prompts]):
        predicted: list[int | None] = []
        probs: list[float | None] = []
        any_probs = False
        failures: list[str] = []
        spent = [0, 0]
        for prompt, answer in zip(prompts, answers, strict=True):
            if isinstance(answer, LLMFailure):
                failures.append(answer.reason)
                predicted += [None] * len(prompt)
                probs += [None] * len(prompt)
                continue
            spent[0] += answer.prompt_tokens
            spent[1] += answer.completion_tokens
            if answer.problem is not None:
                failures.append(answer.problem)
            predicted += list(answer.labels)
            if answer.probabilities is not None:
                any_probs = True
                probs += list(answer.probabilities)
            else:
                probs += [None] * len(prompt)
        failure = f"{len(failures)} of {len(prompts)} prompts failed: {failures[0]}" if failures else None
        runs.append(_Run(labels, predicted, probs if any_probs else None, spent[0], spent[1], failure))
    return runs


def chosen_explanations(scores: pl.DataFrame, explanations: pl.DataFrame) -> dict[UnitKey, dict]:
    """Per unit: its best explanation (kind, sample_index, text), the one whose test score is reported."""
    best = scores.filter((pl.col("split") == "test") & pl.col("best")).select(
        "layer", "neuron", "polarity", "kind", "sample_index"
    )
    rows = best.join(
        explanations.select("layer", "neuron", "polarity", "kind", "sample_index", "explanation"),
        on=["layer", "neuron", "polarity", "kind", "sample_index"],
        how="inner",
    ).filter(pl.col("explanation").is_not_null())
    return {(r["layer"], r["neuron"], r["polarity"]): r for r in rows.iter_rows(named=True)}


def classify_layer(
    explanations: pl.DataFrame,
    scores: pl.DataFrame,
    units: Mapping[UnitKey, Unit],
    classifier: Classifier | None,
    spec: ClassifySpec,
    log: Log | None = None,
) -> pl.DataFrame:
    """One row per (explained unit, scorer): the best explanation's scores on the unit's held-out
    texts and, on the same prompts, its control's. A unit without a chosen explanation or without
    held-out pairs is a row with NULL scores and a `failure_reason`."""
    spec.validate()
    explained = sorted({(r[0], r[1], r[2]) for r in explanations.select("layer", "neuron", "polarity").iter_rows()})
    chosen = chosen_explanations(scores, explanations)
    controls = derangement(chosen)
    lineage = {}
    if classifier is not None:
        lineage = {
            "scorer_backend": classifier.backend,
            "scorer_model": classifier.model,
            "prompt_version": classifier.prompt_version,
        }
    rows: list[dict] = []
    progress = Progress("classified (unit, scorer) pairs", len(explained) * len(spec.scorers), log)
    for key in explained:
        unit = units[key]
        data = held_out(unit, spec) if key in chosen else None
        for scorer in spec.scorers:
            base = {"layer": key[0], "neuron": key[1], "polarity": key[2], "scorer": scorer}
            row = base | _classify_unit(key, unit, data, scorer, chosen, controls, classifier, spec, lineage)
            rows.append(row)
            progress.step()
    return pl.DataFrame(rows, schema=CLASSIFICATION_SCHEMA).sort(CLASSIFICATION_KEY)


def _classify_unit(
    key: UnitKey,
    unit: Unit,
    data: HeldOut | None,
    scorer: str,
    chosen: Mapping[UnitKey, dict],
    controls: Mapping[UnitKey, UnitKey],
    classifier: Classifier | None,
    spec: ClassifySpec,
    lineage: dict,
) -> dict:
    if key not in chosen or data is None:
        reason = "no chosen explanation (see scores: no candidate was simulated without failure)"
        if unit.dead:
            reason = "dead unit: no activation in this direction in the corpus"
        return {"failure_reason": reason}
    best = chosen[key]
    row: dict = {"kind": best["kind"], "sample_index": best["sample_index"]} | lineage
    shown, reason = items(unit, data, scorer, spec)
    if reason is not None:
        return row | {"failure_reason": reason, "n_examples": 0, "n_positive": 0, "n_negative": 0}
    if classifier is None:
        raise ValueError("classification needs a classifier")
    prompts = pack(shown, spec.per_prompt)
    other = controls.get(key)
    texts = [best["explanation"]] + ([chosen[other]["explanation"]] if other is not None else [])
    own, *ctrls = _ask(classifier, scorer, texts, prompts)
    metrics = class_scores(own.labels, own.predicted, own.probability)
    ordered = [i for p in prompts for i in p]
    marked = [[j for j, m in enumerate(i.shown.marked or ()) if m] for i in ordered]
    row |= dataclasses.asdict(metrics) | {
        "seq_ids": [i.seq_id for i in ordered],
        "starts": [i.start for i in ordered],
        "marked": marked if scorer == FUZZING else None,
        "labels": own.labels,
        "predicted": own.predicted,
        "probability": own.probability,
        "n_prompts": len(prompts),
        "prompt_tokens": own.prompt_tokens,
        "completion_tokens": own.completion_tokens,
        "failure_reason": own.failure,
    }
    if other is None:
        return row | {"control_reason": NO_CONTROL}
    control, ctrl = chosen[other], ctrls[0]
    c = class_scores(ctrl.labels, ctrl.predicted, ctrl.probability)
    row |= {
        "control_neuron": other[1],
        "control_polarity": other[2],
        "control_kind": control["kind"],
        "control_sample_index": control["sample_index"],
        "control_accuracy": c.accuracy,
        "control_balanced_accuracy": c.balanced_accuracy,
        "control_auc": c.auc,
        "control_reason": ctrl.failure or c.balanced_accuracy_reason,
        "control_predicted": ctrl.predicted,
        "control_probability": ctrl.probability,
        "control_prompt_tokens": ctrl.prompt_tokens,
        "control_completion_tokens": ctrl.completion_tokens,
    }
    if metrics.balanced_accuracy is not None and c.balanced_accuracy is not None:
        row["gap"] = metrics.balanced_accuracy - c.balanced_accuracy
    if metrics.auc is not None and c.auc is not None:
        row["auc_gap"] = metrics.auc - c.auc
    return row


def classification_discrimination(frame: pl.DataFrame, layer: int, scorer: str) -> Discrimination:
    """The control check of one scorer over a layer's units: balanced accuracy against the control's
    (another unit's explanation on the same prompts), a paired sign-flip test as for simulation."""
    rows = frame.filter(
        (pl.col("layer") == layer)
        & (pl.col("scorer") == scorer)
        & pl.col("balanced_accuracy").is_not_null()
        & pl.col("control_balanced_accuracy").is_not_null()
    )
    verdict = discrimination(rows["balanced_accuracy"].to_list(), rows["control_balanced_accuracy"].to_list())
    return dataclasses.replace(verdict, verdict=verdict.verdict.replace("the simulator", f"the {scorer} scorer"))


def cache_prompt(scorer: str, explanation: str, shown: Sequence[Shown]) -> str:
    """What determines one prompt's answer, as cache key material."""
    return json.dumps(
        {"scorer": scorer, "explanation": explanation, "texts": [[list(s.tokens), s.marked] for s in shown]},
        ensure_ascii=False,
    )

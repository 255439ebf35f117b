"""Known answers for detection and fuzzing, through the real Dagster assets into a real DuckDB file.

The subject is the tiny GPT-2 with six planted neurons (tiny_models.TOKEN_SETS): each fires on
exactly one set of tokens, so a unit's right explanation is known and every other unit's is known
wrong. The scorer models here are rules, not models, so the expected outcome is certain:
- `QuotedRule` follows an explanation: a text activates the unit when it holds a token the
  explanation quotes (detection); the marking is right when every marked token is quoted
  (fuzzing). The unit's own (token-space) explanation must score ~1 balanced accuracy, its control
  (a neighbour's tokens) ~0.5, and the check must pass.
- `BlindRule` ignores the explanation (its labels hash the text): own and control score the same,
  near chance, and the check must warn.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from test_controls import REPLY, QuotedTokens, quoted
from tiny_models import TOKEN_SETS, write_sets_corpus, write_sets_model

from assets.classification import ClassifyResource
from assets.resources import CorpusResource, ExplainResource, SamplingResource, SimulatorResource, SubjectModelResource
from pipeline.classify import DETECTION, Answer, Classifier, Shown, render
from pipeline.llm import LLMFailure
from pipeline.simulator import Simulator

NEURONS = sorted(TOKEN_SETS)
STAGES = ["subject_model", "corpus_tokens", "activation_records", "top_k_examples"]


class QuotedRule(Classifier):
    backend, model, prompt_version = "rule", "quoted-tokens", "rule-v1"

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        named = quoted(explanation)
        out: list[Answer | LLMFailure] = []
        for shown in prompts:
            if scorer == DETECTION:
                labels = [int(any(t in named for t in s.tokens)) for s in shown]
            else:
                marked = [[t for t, m in zip(s.tokens, s.marked or (), strict=True) if m] for s in shown]
                labels = [int(all(t in named for t in m)) for m in marked]
            out.append(Answer(list(labels), [0.25 + 0.5 * v for v in labels], 10 * len(shown), 2 * len(shown)))
        return out


class BlindRule(Classifier):
    backend, model, prompt_version = "rule", "blind", "rule-v1"

    def classify(self, scorer: str, explanation: str, prompts: Sequence[Sequence[Shown]]) -> list[Answer | LLMFailure]:
        out: list[Answer | LLMFailure] = []
        for shown in prompts:
            hashes = [zlib.crc32(render(s).encode()) for s in shown]
            out.append(Answer([h % 2 for h in hashes], [(h % 1000) / 1000 for h in hashes], 1, 1))
        return out


class RuleScorers(SimulatorResource):
    """The quoted-tokens rule simulates (so token-space explanations are chosen); a rule classifies."""

    rule: str = "quoted"

    def client(self) -> Simulator:
        return QuotedTokens()

    def classifier(self) -> Classifier:
        return {"quoted": QuotedRule, "blind": BlindRule}[self.rule]()


def _run(root: Path, simulator: SimulatorResource, server: LoopbackServer, **extra: object) -> tuple[Path, object]:
    database = root / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 0),
        subject=SubjectModelResource(model=str(write_sets_model(root / "model"))),
        corpus=CorpusResource(source=str(write_sets_corpus(root / "corpus.jsonl")), seq_len=8, n_sequences=256),
        sampling=SamplingResource(top_k=16, random_k=16, quantile_bins=4, per_quantile=8, batch_size=32),
        explainer=loopback_llm(server, cache_path=str(root / "cache.sqlite"))["explainer"],
        simulator=simulator,
        explain=ExplainResource(neuron_ids=NEURONS),
        classify=ClassifyResource(),
        selection=[*STAGES, "explanations", "simulations", "scores", "classification_scores"],
        **extra,  # type: ignore[arg-type]
    )
    assert result.success
    return database, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    with LoopbackServer(ServerState(replies=[("the main thing this neuron does is find", REPLY)])) as server:
        for rule in ("quoted", "blind"):
            out[rule] = _run(tmp_path_factory.mktemp(rule), RuleScorers(rule=rule), server)
    return out


def _check(result: object) -> object:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "classifier_discriminates"]
    return evaluation


def test_a_right_explanation_scores_one_and_its_control_chance(runs: dict) -> None:
    database, result = runs["quoted"]
    rows = query(database)(
        "select scorer, neuron, kind, balanced_accuracy, control_balanced_accuracy, control_neuron, auc, n_positive,"
        " n_negative, n_examples, n_answered from atlas.classification_scores order by scorer, neuron"
    )
    assert sorted({(r[0], r[1]) for r in rows}) == [(s, n) for s in ("detection", "fuzzing") for n in NEURONS]
    for scorer in ("detection", "fuzzing"):
        mine = [r for r in rows if r[0] == scorer]
        for _, neuron, kind, score, _, control_neuron, auc, pos, neg, n, answered in mine:
            assert kind == "token_space", neuron  # the explainer double's text is degenerate
            assert pos == neg and pos >= 3 and n == pos + neg == answered, (scorer, neuron, pos, neg)
            assert control_neuron != neuron
            # Not always 1: a rare token of the set may be missing from the token-space explanation.
            assert score >= 0.75 and auc >= 0.75, (scorer, neuron, score, auc)
        mean_score = sum(r[3] for r in mine) / len(mine)
        mean_control = sum(r[4] for r in mine) / len(mine)
        assert mean_score >= 0.9, (scorer, mean_score)
        assert abs(mean_control - 0.5) <= 0.15, (scorer, mean_control)
    evaluation = _check(result)
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["layer_0_detection_discriminates"].value is True
    assert evaluation.metadata["layer_0_fuzzing_discriminates"].value is True


def test_a_blind_scorer_sits_at_chance_and_the_check_warns(runs: dict) -> None:
    database, result = runs["blind"]
    rows = query(database)(
        "select scorer, balanced_accuracy, control_balanced_accuracy, gap from atlas.classification_scores"
    )
    assert rows and all(g == pytest.approx(0.0, abs=1e-12) for *_, g in rows)  # blind: right = wrong
    for scorer in ("detection", "fuzzing"):
        values = [r[1] for r in rows if r[0] == scorer]
        assert abs(sum(values) / len(values) - 0.5) <= 0.2, (scorer, values)
    evaluation = _check(result)
    assert not evaluation.passed and evaluation.severity.value == "WARN"
    assert "does NOT" in evaluation.description


def test_held_out_texts_are_quantile_samples_the_explainers_never_read(runs: dict) -> None:
    q = query(runs["quoted"][0])
    # The raw quantile samples do overlap what the explainers read here, so the test can fail.
    raw = q(
        "select count(*) from atlas.records_long q join atlas.examples_long t using (layer, neuron, seq_id)"
        " where q.kind = 'quantile' and (t.kind = 'top' or t.split in ('train', 'calibration'))"
    )
    assert raw[0][0] > 0
    shown = q(
        "select neuron, scorer, unnest(seq_ids), unnest(labels) from atlas.classification_scores"
    )
    assert shown
    seen = set(
        q(
            "select neuron, seq_id from atlas.examples_long where kind = 'top'"
            " or (kind = 'random' and split in ('train', 'calibration'))"
        )
    )
    assert not [(n, s) for n, _, s, _ in shown if (n, s) in seen]
    quantile = set(q("select neuron, seq_id from atlas.records_long where kind = 'quantile'"))
    # Every activating text is a quantile sample; fuzzing shows only activating texts.
    assert all((n, s) in quantile for n, _, s, label in shown if label == 1)
    assert all((n, s) in quantile for n, scorer, s, _ in shown if scorer == "fuzzing")
    # The planted truth, from the model's definition: label 1 texts hold a token of the unit's set.
    tokens = dict(q("select seq_id, tokens from atlas.corpus_tokens"))
    for neuron, scorer, seq, label in shown:
        if scorer == "detection":
            assert any(t in TOKEN_SETS[neuron] for t in tokens[seq]) == bool(label), (neuron, seq)


def test_fuzzing_marks_right_and_wrong_tokens_of_the_same_texts(runs: dict) -> None:
    q = query(runs["quoted"][0])
    tokens = dict(q("select seq_id, tokens from atlas.corpus_tokens"))
    rows = q(
        "select neuron, seq_ids, marked, labels from atlas.classification_scores"
        " where scorer = 'fuzzing' and n_examples > 0"
    )
    for neuron, seqs, marked, labels in rows:
        right = sorted(s for s, v in zip(seqs, labels, strict=True) if v == 1)
        assert right == sorted(s for s, v in zip(seqs, labels, strict=True) if v == 0)  # each text both ways
        for seq, marks, label in zip(seqs, marked, labels, strict=True):
            hits = [tokens[seq][j] in TOKEN_SETS[neuron] for j in marks]
            assert marks and (all(hits) if label else not any(hits)), (neuron, seq, label)

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
Both rules live in tests/rule_simulators.py. The same runs check that neuron_summary and the viewer
show the table's numbers, and the report's rank correlations against Spearman's rho computed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from rule_simulators import RuleSimulator
from test_controls import REPLY
from tiny_models import TOKEN_SETS, write_sets_corpus, write_sets_model

from assets.config import ClassifyConfig, ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SimulatorResource, SubjectModelResource
from pipeline.core.classify import ClassifySpec, held_out, items
from pipeline.core.units import Example, Unit
from pipeline.infra.report import main as report_main
from pipeline.infra.viewer import DATA_FILE, read_data

NEURONS = sorted(TOKEN_SETS)
STAGES = ["subject_model", "corpus_tokens", "activation_records", "unit_examples"]
LLM_STAGES = ["explanations", "simulations", "scores", "ablations", "classification_scores", "neuron_viewer"]


def _run(root: Path, simulator: SimulatorResource, server: LoopbackServer, **extra: object) -> tuple[Path, object]:
    database = root / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 0),
        subject=SubjectModelResource(model=str(write_sets_model(root / "model"))),
        corpus=CorpusResource(source=str(write_sets_corpus(root / "corpus.jsonl")), seq_len=8, n_sequences=256),
        sampling=SamplingConfig(top_k=16, random_k=16, quantile_bins=4, per_quantile=8, batch_size=32),
        explainer=loopback_llm(server, cache_path=str(root / "cache.sqlite"))["explainer"],
        simulator=simulator,
        explain=ExplainConfig(neuron_ids=NEURONS),
        classify=ClassifyConfig(),
        selection=[*STAGES, *LLM_STAGES],
        **extra,  # type: ignore[arg-type]
    )
    assert result.success
    return database, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    with LoopbackServer(ServerState(replies=[("the main thing this neuron does is find", REPLY)])) as server:
        for rule in ("quoted", "blind"):
            out[rule] = _run(tmp_path_factory.mktemp(rule), RuleSimulator(rule=rule), server)
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
        " where q.record_list = 'quantile' and (t.record_kind = 'top' or t.split in ('train', 'calibration'))"
    )
    assert raw[0][0] > 0
    shown = q("select neuron, scorer, unnest(seq_ids), unnest(labels) from atlas.classification_scores")
    assert shown
    seen = set(
        q(
            "select neuron, seq_id from atlas.examples_long where record_kind = 'top'"
            " or (record_kind = 'random' and split in ('train', 'calibration'))"
        )
    )
    assert not [(n, s) for n, _, s, _ in shown if (n, s) in seen]
    quantile = set(q("select neuron, seq_id from atlas.records_long where record_list = 'quantile'"))
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


def test_neuron_summary_and_the_viewer_show_both_scores_beside_simulation_and_ablation(runs: dict) -> None:
    database, _ = runs["quoted"]
    q = query(database)
    table = {
        (n, p, s): (ba, c, g)
        for n, p, s, ba, c, g in q(
            "select neuron, polarity, scorer, balanced_accuracy, control_balanced_accuracy, gap"
            " from atlas.classification_scores"
        )
    }
    rows = q(
        "select neuron, polarity, score, ablation_score, detection_score, detection_control, detection_gap,"
        " fuzzing_score, fuzzing_control, fuzzing_gap from atlas.neuron_summary order by neuron"
    )
    assert [r[0] for r in rows] == NEURONS
    for neuron, polarity, score, _ablation, *classified in rows:
        assert score is not None
        assert tuple(classified[:3]) == table[(neuron, polarity, "detection")]
        assert tuple(classified[3:]) == table[(neuron, polarity, "fuzzing")]
    layer = database.parent / "viewer" / "layer_0"
    index = (layer / "index.html").read_text(encoding="utf-8")
    assert "<th>detection</th><th>fuzzing</th>" in index
    data = read_data((layer / DATA_FILE).read_text(encoding="utf-8"))
    units = {(n["neuron"], u["polarity"]): u for n in data["neurons"] for u in n["units"]}
    for neuron in NEURONS:
        # The neuron view's data holds the table's rows (the page prints them as the index does).
        for scorer in ("detection", "fuzzing"):
            shown = units[(neuron, "+")]["classification"][scorer]
            ba, control, gap = table[(neuron, "+", scorer)]
            assert (shown["balanced_accuracy"], shown["control_balanced_accuracy"], shown["gap"]) == (ba, control, gap)
        # The index row of the unit shows the same two numbers after its ablation column.
        cells = index.split(f'href="#{neuron}/pos">', 1)[1].split("</tr>", 1)[0].split("<td class=num>")
        assert [c.split("<", 1)[0] for c in cells[7:9]] == [
            f"{table[(neuron, '+', s)][0]:.3f}" for s in ("detection", "fuzzing")
        ]


def _spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho from its definition, ties given their average rank (written here, apart from
    `pipeline.infra.report`, which ranks through polars); None for a constant side."""

    def ranks(v: list[float]) -> np.ndarray:
        return np.array([sum(w < u for w in v) + (sum(w == u for w in v) + 1) / 2 for u in v])

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def test_the_report_prints_rank_correlations_of_the_four_scores(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked against Spearman's rho computed here; the right rule scores every unit 1 (a constant
    side: undefined), the blind one varies, so at least one printed figure is a number."""
    defined = 0
    for rule in ("quoted", "blind"):
        database, _ = runs[rule]
        report_main(["classification", "--db", str(database)])
        out = capsys.readouterr().out
        assert "Layer 0: 6 units" in out and "per unit (with its control)" in out
        printed = {
            tuple(line.split()[:3:2]): line.split()[3]
            for line in out.splitlines()
            if " vs " in line and "(n = " in line
        }
        assert set(printed) == {
            (a, b) for i, a in enumerate(("simulation", "detection", "fuzzing", "ablation"))
            for b in ("simulation", "detection", "fuzzing", "ablation")[i + 1 :]
        }  # fmt: skip
        scores = {
            (n, s): (sim, ba)
            for n, s, sim, ba in query(database)(
                "select neuron, d.scorer, s.corr_all, d.balanced_accuracy from atlas.scores s"
                " join atlas.classification_scores d using (layer, neuron, polarity)"
                " where s.split = 'test' and s.best"
            )
        }
        det = [scores[(n, "detection")] for n in NEURONS]
        fuz = [scores[(n, "fuzzing")] for n in NEURONS]
        for pair, x, y in (
            (("simulation", "detection"), [v[0] for v in det], [v[1] for v in det]),
            (("detection", "fuzzing"), [v[1] for v in det], [v[1] for v in fuz]),
        ):
            expected, shown = _spearman(x, y), printed[pair]
            if expected is None:
                assert shown == "undefined", (rule, pair, shown)
            else:
                defined += 1
                assert float(shown) == pytest.approx(expected, abs=1e-3), (rule, pair)
    assert defined


def _example(kind: str, split: str, seq_id: int, acts: list[float]) -> Example:
    tokens = tuple(f"t{seq_id}_{i}" for i in range(len(acts)))
    return Example(kind, split, seq_id, seq_id, tokens, tuple(range(len(acts))), np.array(acts, dtype=np.float32))


def test_a_dense_unit_gets_non_activating_windows_and_activating_windows_around_the_peak() -> None:
    """Every held-out sequence of this unit reaches level 1 somewhere (the first token), so whole
    sequences leave no negatives; windows of 4 tokens do, and each activating window holds its
    sequence's strongest token."""
    dense = [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # level 1 at token 0 only, on a max of 10
    quantile = [_example("quantile", "test", 100 + i, dense[:7] + [0, 0, 2.0 + i, 0, 0]) for i in range(4)]
    quiet = [_example("random", "test", 200 + i, dense) for i in range(4)]
    top = [_example("top", "train", 1, [10.0] * 12)]
    unit = Unit(0, 0, "+", 10.0, tuple(top + quantile + quiet), ())
    whole = held_out(unit, ClassifySpec(window=12))
    assert len(whole.activating) == 4 and whole.quiet == []  # the old outcome: no pairs
    cut = held_out(unit, ClassifySpec(window=4))
    assert [(e.seq_id, e.start, len(e.tokens)) for e in cut.activating] == [(100 + i, 7, 4) for i in range(4)]
    assert all(float(np.max(e.acts)) == 2.0 + i for i, e in enumerate(cut.activating))
    assert cut.quiet and all(unit.levels(e).max() < 1 and len(e.tokens) == 4 for e in cut.quiet)
    assert all(e.tokens == e_full.tokens[e.start : e.start + 4] for e in cut.quiet for e_full in quiet + quantile
               if e_full.seq_id == e.seq_id)  # fmt: skip
    # One window of each sequence comes before a second window of any.
    first = [e.seq_id for e in cut.quiet[: len({e.seq_id for e in cut.quiet})]]
    assert len(first) == len(set(first))
    shown, reason = items(unit, cut, "detection", ClassifySpec(window=4))
    assert reason is None and sorted(i.label for i in shown) == [0] * 4 + [1] * 4


def test_a_unit_whose_quantile_samples_stay_quiet_is_judged_on_its_held_out_top_records() -> None:
    """Only its top records activate it: the ones the explainer never read stand in for quantile
    samples, the train ones never appear."""
    quiet_quantile = [_example("quantile", "test", 100 + i, [0.1, 0.0, 0.2]) for i in range(3)]
    tops = [_example("top", split, i, [0.0, 9.0 + i, 0.0]) for i, split in enumerate(["train", "valid", "test"])]
    unit = Unit(0, 0, "+", 11.0, tuple(tops + quiet_quantile), ())
    data = held_out(unit, ClassifySpec())
    assert [e.seq_id for e in data.activating] == [1, 2]
    assert sorted(e.seq_id for e in data.quiet) == [100, 101, 102]

"""Known answers for the control, the held-out reporting and calibration, through the real Dagster
assets into a real DuckDB file.

The subject is a tiny GPT-2 with six planted neurons, each firing on exactly one set of tokens
(tiny_models.TOKEN_SETS), so every unit's right explanation is known and every other unit's is
known wrong. Simulators here are rules, not models, so the expected outcome is certain:
- `QuotedTokens` follows an explanation: level 10 on the tokens it quotes, 0 elsewhere. A unit's
  token-space explanation must beat its control (a neighbour's tokens), and the check must pass.
- `Blind` ignores the explanation (the same guess whatever it is told). The check must warn.
- `ShiftedQuotedTokens` follows the explanation on another scale (levels 3 and 8): correlation is
  unchanged and calibration must recover the map back to activations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from rule_simulators import RULES, RuleSimulator
from tiny_models import SET_GAIN, TOKEN_SETS, write_sets_corpus, write_sets_model

from assets.config import ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.infra.viewer import load_layer, render_index
from pipeline.infra.warehouse import open_warehouse

NEURONS = sorted(TOKEN_SETS)
REPLY = " a pattern the explainer double always writes.\n"


def _run(root: Path, rule: str, server: LoopbackServer) -> tuple[Path, object]:
    model = write_sets_model(root / "model")
    corpus = write_sets_corpus(root / "corpus.jsonl")
    database = root / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 0),
        subject=SubjectModelResource(model=str(model)),
        corpus=CorpusResource(source=str(corpus), seq_len=16, n_sequences=64, seed=0),
        sampling=SamplingConfig(top_k=16, random_k=16, quantile_bins=2, per_quantile=2, batch_size=16),
        explainer=loopback_llm(server, cache_path=str(root / "cache.sqlite"))["explainer"],
        simulator=RuleSimulator(rule=rule),
        explain=ExplainConfig(neuron_ids=NEURONS),
        selection=["subject_model", "corpus_tokens", "activation_records", "unit_examples"]
        + ["explanations", "simulations", "scores"],
    )
    assert result.success
    return database, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    with LoopbackServer(ServerState(replies=[("the main thing this neuron does is find", REPLY)])) as server:
        for rule in RULES:
            out[rule] = _run(tmp_path_factory.mktemp(rule), rule, server)
    return out


def _check(result: object) -> object:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "simulator_discriminates"]
    return evaluation


def test_a_right_explanation_beats_its_control_and_the_check_passes(runs: dict) -> None:
    database, result = runs["quoted"]
    rows = query(database)(
        "select neuron, kind, corr_all, control_neuron, control_corr_all, gap from atlas.scores"
        " where split = 'test' and best order by neuron"
    )
    assert [r[0] for r in rows] == NEURONS
    for neuron, kind, score, control_neuron, control, gap in rows:
        assert kind == "token_space", (neuron, kind)  # the explainer double's text is degenerate
        assert control_neuron != neuron and control_neuron in NEURONS
        assert score > 0.95 and control < 0.2 and gap > 0.75, (neuron, score, control)
    evaluation = _check(result)
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["layer_0_discriminates"].value is True
    assert evaluation.metadata["layer_0_mean_gap"].value > 0.75


def test_the_same_reply_for_every_unit_is_flagged_and_never_chosen(runs: dict) -> None:
    database, _ = runs["quoted"]
    q = query(database)
    flagged = q(
        "select count(distinct neuron), min(degenerate_reason) from atlas.explanations"
        " where kind = 'llm' and degenerate_reason is not null"
    )
    assert flagged[0][0] == len(NEURONS) and "the same explanation as 6 of the layer's 6 units" == flagged[0][1]
    assert q("select count(*) from atlas.scores where kind = 'llm' and (best or selected)") == [(0,)]


def test_a_blind_simulator_makes_the_check_warn_and_the_viewer_say_so(runs: dict) -> None:
    database, result = runs["blind"]
    evaluation = _check(result)
    assert not evaluation.passed and evaluation.severity.value == "WARN"
    assert "does NOT" in evaluation.description
    gaps = query(database)("select gap from atlas.scores where split = 'test' and best")
    assert gaps and all(g == pytest.approx(0.0, abs=1e-9) for (g,) in gaps)  # blind: right = wrong
    with open_warehouse(str(database), read_only=True) as conn:
        page = render_index(load_layer(conn, 0))
    assert 'id="no-signal"' in page and "exercises the pipeline" in page
    with open_warehouse(str(runs["quoted"][0]), read_only=True) as conn:
        assert 'id="no-signal"' not in render_index(load_layer(conn, 0))


def test_calibration_recovers_a_simulation_on_another_scale(runs: dict) -> None:
    rows = {}
    for rule in ("quoted", "shifted"):
        rows[rule] = query(runs[rule][0])(
            "select neuron, corr_all, r2_all, absdev_all, calibration_slope, calibration_intercept"
            " from atlas.scores where split = 'test' and best order by neuron"
        )
    for (n, c0, r0, a0, s0, i0), (_, c1, r1, a1, s1, i1) in zip(rows["quoted"], rows["shifted"], strict=True):
        # Levels 0/10 vs 3/8 for the same tokens: the same correlation, and calibration maps both to 0/GAIN.
        assert c1 == pytest.approx(c0, abs=1e-9)
        assert r1 == pytest.approx(r0, abs=1e-6) and a1 == pytest.approx(a0, abs=1e-6)
        assert s0 == pytest.approx(SET_GAIN / 10, rel=1e-3) and i0 == pytest.approx(0.0, abs=1e-3), n
        assert s1 == pytest.approx(SET_GAIN / 5, rel=1e-3) and i1 == pytest.approx(-3 * SET_GAIN / 5, rel=1e-3), n
        assert r0 > 0.99, n


def test_held_out_sequences_never_include_a_top_record(runs: dict) -> None:
    q = query(runs["quoted"][0])
    # The capture draws the random sample among the sequences that are not top records.
    raw = q(
        "select count(*) from atlas.records_long r join atlas.records_long t using (layer, neuron, seq_id)"
        " where r.record_list = 'random' and t.record_list = 'top'"
    )
    assert raw == [(0,)]
    leaks = q(
        "select count(*) from atlas.examples_long h join atlas.examples_long t using (layer, neuron, seq_id)"
        " where h.split <> 'train' and t.record_kind = 'top' and (h.record_kind <> 'top' or h.rank <> t.rank)"
    )
    assert leaks == [(0,)]
    simulated = q(
        "select count(*) from atlas.simulations s join atlas.examples_long t using (layer, neuron, seq_id)"
        " where t.record_kind = 'top' and s.record_kind = 'random'"
    )
    assert simulated == [(0,)]
    splits = q("select distinct split from atlas.simulations order by split")
    assert splits == [("calibration",), ("test",), ("valid",)]

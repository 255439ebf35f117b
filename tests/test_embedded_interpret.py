"""Slow end to end on the embedded default: the real Gemma 3 270M is the subject, the explainer and
the simulator; 2 layers x 2 neurons x both directions (Gemma's MLP is gated) go through
explanations, simulations, scores, ablations (all 4 units of each layer), detection and fuzzing
(a few held-out texts per unit, to keep it short) and the neuron viewer in one run. (The README's
figures come from the default run: 8 neurons per layer and 256 sequences. With 4 neurons per
layer this test took 59 of the 85 minutes of a clean-clone `.ci/run` on busy shared cores; CI
has 90.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import local_llm, query, run_stages

from assets.config import AblationConfig, ClassifyConfig, ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.models import EMBEDDED, model_layer_count
from pipeline.infra.report import main as report_main
from pipeline.infra.viewer import DATA_FILE, read_data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_layers_two_neurons_both_directions_explained_simulated_scored_ablated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        model_layer_count(EMBEDDED),
        (0, 1),
        subject=SubjectModelResource(model=EMBEDDED),
        corpus=CorpusResource(n_sequences=64),
        sampling=SamplingConfig(),
        **local_llm(),
        explain=ExplainConfig(n_neurons=2),
        ablation=AblationConfig(top_n=4),
        classify=ClassifyConfig(max_per_class=2, examples_per_prompt=4),
    )
    assert result.success
    q = query(database)
    counts = q("select layer, kind, count(*), count(explanation) from atlas.explanations group by all order by all")
    units = q("select layer, count(distinct (neuron, polarity)) from atlas.explanations group by all order by all")
    n_units = dict(units)
    # Both directions of every explained neuron (Gemma's gated MLP fires both ways).
    directions = q("select layer, polarity, count(distinct neuron) from atlas.explanations group by all order by all")
    assert directions == [(layer, p, 2) for layer in (0, 1) for p in ("+", "-")]
    samples = ExplainConfig().samples
    assert {(layer, kind): n for layer, kind, n, _ in counts} == {
        (layer, kind): n_units[layer] * (samples if kind == "llm" else 1)
        for layer in (0, 1)
        for kind in ("llm", "token_lookup", "token_space")
    }
    # Every reported unit has a test score beside its control, or a reason; the controls are other units.
    best = q("select layer, neuron, polarity, corr_all, corr_all_reason, failure_reason, control_neuron,"
             " control_polarity from atlas.scores where best and split = 'test'")  # fmt: skip
    assert len(best) >= sum(n_units.values()) - 2
    for _layer, neuron, polarity, score, reason, failure, control_neuron, control_polarity in best:
        assert score is not None or reason or failure
        assert (control_neuron, control_polarity) != (neuron, polarity)
    rows = q((ROOT / "warehouse" / "queries" / "llm_vs_baseline.sql").read_text())
    assert {(r[0], r[1]) for r in rows} >= {
        (layer, kind) for layer in (0, 1) for kind in ("token_lookup", "token_space")
    }
    print("\n".join(str(r) for r in rows))
    ablations = q("select layer, kl_mean, kl_simulated, ablation_score, ablation_score_reason from atlas.ablations")
    # Every unit with a test score is ablated (top_n 4 = all of a layer's units); a unit whose
    # simulation correlation is undefined (constant prediction) has none and is left out.
    scored = dict(
        q("select layer, count(*) from atlas.scores where best and split = 'test' and corr_all is not null group by 1")
    )
    assert all(scored.get(layer, 0) >= 3 for layer in (0, 1)), scored
    assert sorted(r[0] for r in ablations) == [layer for layer in (0, 1) for _ in range(min(4, scored[layer]))]
    assert all(r[1] > 0 and r[2] >= 0 for r in ablations)  # real neurons of a real model move the output
    assert all((r[3] is None) == (r[4] is not None) for r in ablations)
    for layer in (0, 1):  # the viewer rendered Gemma's tokens too, and says whether there is any signal
        index = (tmp_path / "viewer" / f"layer_{layer}" / "index.html").read_text()
        assert len(re.findall(r'href="#\d+/(?:pos|neg)"', index)) == n_units[layer]
        data = read_data((tmp_path / "viewer" / f"layer_{layer}" / DATA_FILE).read_text(encoding="utf-8"))
        assert sum(len(n["units"]) for n in data["neurons"]) == n_units[layer]
        assert "Control check passed" in index or 'id="no-signal"' in index
    # Detection and fuzzing for every explained unit: a score (the in-process scorer gives AUC too) or a reason.
    classified = q(
        "select layer, neuron, polarity, scorer, balanced_accuracy, auc, failure_reason, control_neuron"
        " from atlas.classification_scores"
    )
    assert sorted({(r[0], r[3]) for r in classified}) == [(la, s) for la in (0, 1) for s in ("detection", "fuzzing")]
    assert len(classified) == 2 * sum(n_units.values())
    for _layer, _neuron, _polarity, _scorer, score, auc, failure, _control in classified:
        assert (score is not None and auc is not None) or failure, classified
    assert q("select count(*) from atlas.neuron_summary where detection_score is not null") == [
        (sum(1 for r in classified if r[3] == "detection" and r[4] is not None),)
    ]
    report_main(["signal", "--db", str(database)])
    report_main(["ablation", "--db", str(database)])
    report_main(["classification", "--db", str(database)])
    out = capsys.readouterr().out
    assert "verdict:" in out and "LLM explanations:" in out
    n_ablated = sum(r[3] is not None for r in ablations)
    assert f"Spearman rank correlation of simulation (test) and ablation scores over {n_ablated} units" in out
    assert "simulation vs detection" in out and "fuzzing vs ablation" in out
    with capsys.disabled():
        print(out)  # the figures the README quotes

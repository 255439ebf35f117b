"""Slow end to end on the embedded default: the real Gemma 3 270M is the subject, the explainer and
the simulator; 2 layers x 8 neurons go through explanations, simulations, scores and (the best 4
per layer) ablations and the neuron viewer in one run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import local_llm, query, run_stages

from assets.resources import (
    AblationResource,
    CorpusResource,
    ExplainResource,
    SamplingResource,
    SubjectModelResource,
)
from pipeline.models import EMBEDDED, model_layer_count
from pipeline.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_layers_eight_neurons_explained_simulated_scored_ablated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        model_layer_count(EMBEDDED),
        (0, 1),
        subject=SubjectModelResource(model=EMBEDDED),
        corpus=CorpusResource(n_sequences=64),
        sampling=SamplingResource(),
        **local_llm(),
        explain=ExplainResource(n_neurons=8),
        ablation=AblationResource(top_n=4),
    )
    assert result.success
    q = query(database)
    counts = q("select layer, kind, count(*), count(explanation) from atlas.explanations group by all order by all")
    assert [(layer, kind, n) for layer, kind, n, _ in counts] == [
        (layer, kind, 8) for layer in (0, 1) for kind in ("llm", "token_lookup")
    ]
    assert all(ok == 8 for layer, kind, _, ok in counts if kind == "llm")
    sims = q("select count(*) from atlas.simulations where simulated is not null and kind = 'llm'")[0][0]
    assert sims == 2 * 8 * 10  # 5 valid top + 5 valid random per explanation
    scored = q("select count(*) from atlas.scores where kind = 'llm' and corr_all is not null")[0][0]
    assert scored >= 12  # a few neurons may be constant on their held-out records (NULL + reason)
    unscored = q("select corr_all_reason from atlas.scores where corr_all is null and failure_reason is null")
    assert all(reason for (reason,) in unscored)
    rows = q((ROOT / "warehouse" / "queries" / "llm_vs_baseline.sql").read_text())
    assert {(r[0], r[1]) for r in rows} == {(layer, kind) for layer in (0, 1) for kind in ("llm", "token_lookup")}
    print("\n".join(str(r) for r in rows))
    ablations = q("select layer, kl_mean, kl_simulated, ablation_score, ablation_score_reason from atlas.ablations")
    assert sorted(r[0] for r in ablations) == [0] * 4 + [1] * 4
    assert all(r[1] > 0 and r[2] >= 0 for r in ablations)  # real neurons of a real model move the output
    assert all((r[3] is None) == (r[4] is not None) for r in ablations)
    for layer in (0, 1):  # the viewer rendered Gemma's tokens too
        pages = sorted(p.name for p in (tmp_path / "viewer" / f"layer_{layer}").glob("neuron_*.html"))
        assert len(pages) == 8
        assert (tmp_path / "viewer" / f"layer_{layer}" / "index.html").read_text().count('href="neuron_') == 8
    report_main(["ablation", "--db", str(database)])
    out = capsys.readouterr().out
    assert "Spearman rank correlation of simulation and ablation scores over 8 neurons" in out

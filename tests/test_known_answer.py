"""Known answer: a GPT-2 whose layer-0 neuron 3 fires exactly on digits, run through the real
Dagster stages into a real DuckDB file. The pipeline must find digit sequences as its top records
and exactly the digits as its top tokens, with the activations the weights dictate."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import code_step, query, run_stages
from tiny_models import DIGIT_NEURON, DIGITS, digit_activation

from assets.config import SamplingConfig, TopTokensConfig
from assets.resources import CorpusResource, SubjectModelResource

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory: pytest.TempPathFactory, digit_model_dir: Path, digit_corpus: Path) -> Path:
    database = tmp_path_factory.mktemp("wh") / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 1),
        subject=SubjectModelResource(model=str(digit_model_dir)),
        corpus=CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=64, seed=3),
        sampling=SamplingConfig(top_k=8, random_k=8, quantile_bins=2, per_quantile=2, batch_size=5),
        top_tokens=TopTokensConfig(n_top_tokens=20, min_token_count=1),
    )
    assert result.success
    return database


def test_top_records_are_digit_sequences_with_exact_activations(digit_run: Path) -> None:
    q = query(digit_run)
    rows = q(
        "select rank, max_act, tokens, acts, min_act from atlas.records_long where layer = 0 and neuron = ?"
        " and record_list = 'top'"
        " order by rank",
        [DIGIT_NEURON],
    )
    assert len(rows) == 8
    maxes = [r[1] for r in rows]
    assert maxes == sorted(maxes, reverse=True)
    for _rank, max_act, tokens, acts, min_act in rows:
        assert any(t in DIGITS for t in tokens), tokens
        for token, act in zip(tokens, acts, strict=True):
            assert act == pytest.approx(digit_activation(token), abs=1e-4 + code_step(max_act, min_act))
        assert max_act == pytest.approx(max(digit_activation(t) for t in tokens), abs=1e-4)
    # The strongest digit in the corpus leads.
    all_tokens = {t for (toks,) in q("select tokens from atlas.corpus_tokens") for t in toks}
    best = max((t for t in all_tokens if t in DIGITS), key=int)
    assert maxes[0] == pytest.approx(digit_activation(best), abs=1e-4)


def test_top_tokens_are_exactly_the_digits(digit_run: Path) -> None:
    q = query(digit_run)
    tokens = q(
        "select token, mean_activation, count from atlas.top_tokens where layer = 0 and neuron = ? order by token_rank",
        [DIGIT_NEURON],
    )
    # Top tokens are read from the train and calibration records only: exactly the digits they hold.
    seen = q(
        "select distinct unnest(tokens) from atlas.examples_long where layer = 0 and neuron = ?"
        " and split in ('train', 'calibration')",
        [DIGIT_NEURON],
    )
    shown = {t for (t,) in seen if t in DIGITS}
    assert len(shown) >= 8
    assert {t for t, _, _ in tokens} == shown
    # Ranked by mean activation, which the weights make increasing in the digit's value.
    assert [t for t, _, _ in tokens] == sorted(shown, key=int, reverse=True)
    # Each stored activation is within its record's code step, so their mean is within the largest.
    ((step,),) = q(
        "select max(max_act - min_act) / 510 from atlas.records_long where layer = 0 and neuron = ?"
        " and record_list in ('top', 'random')",
        [DIGIT_NEURON],
    )
    for token, mean, count in tokens:
        assert mean == pytest.approx(digit_activation(token), abs=1e-4 + step)
        assert count >= 1


def test_levels_follow_the_paper_normalization(digit_run: Path) -> None:
    q = query(digit_run)
    rows = q(
        "select max_activation, tokens, acts, levels, split from atlas.examples_long where layer = 0 and neuron = ?",
        [DIGIT_NEURON],
    )
    assert {r[4] for r in rows} == {"train", "calibration", "valid", "test"}
    for max_activation, tokens, acts, levels, _split in rows:
        for token, act, level in zip(tokens, acts, levels, strict=True):
            expected = min(10, int(10 * max(act, 0.0) / max_activation))
            assert level == expected
            assert (level > 0) == (token in DIGITS)


def test_example_queries_and_views_run(digit_run: Path) -> None:
    """The SQL files shipped under warehouse/ for the first stages run against a real warehouse
    (those over explanations and scores run in test_interpret)."""
    q = query(digit_run)
    files = [p for p in sorted((ROOT / "warehouse" / "queries").glob("*.sql")) if "atlas.scores" not in p.read_text()]
    assert files
    for path in files:
        assert q(path.read_text()), path.name
    views = {r[0] for r in q("select table_name from information_schema.tables where table_type = 'VIEW'")}
    assert views == {  # the others need later stages
        "sequences_long",
        "records_long",
        "examples_long",
        "top_tokens",
        "current_corpus_tokens",
        "current_activation_records",
        "current_unit_examples",
        "top_k_examples",  # unit_examples under its old name, for saved SQL
        "current_top_k_examples",
    }

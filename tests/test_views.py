"""The SQL views are made in the order their `-- requires:` lines give, so one view can read
another whatever their names: examples_long and records_long read their activations from
sequences_long (one decoder of the stored 8-bit codes), current_top_k_examples reads
current_unit_examples. Checked on a hand-made warehouse whose values are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import duckdb

from pipeline.infra.warehouse import SCHEMA, create_views, view_files, view_requirements, views_for

ALL_TABLES = {
    "subject_model",
    "corpus_tokens",
    "activation_records",
    "unit_examples",
    "explanations",
    "simulations",
    "scores",
    "ablations",
    "classification_scores",
}


def test_every_view_comes_after_the_views_it_reads() -> None:
    order = [p.stem for p in views_for(ALL_TABLES)]
    assert sorted(order) == sorted(p.stem for p in view_files())
    for path in view_files():
        for needed in view_requirements(path) - ALL_TABLES:
            assert needed in order, f"{path.name} requires {needed}, neither a table nor a view"
            assert order.index(needed) < order.index(path.stem), f"{path.stem} before {needed}"
    # The reason for the order: by name, examples_long comes before the view it reads.
    assert "examples_long" < "sequences_long"


def test_a_view_waits_for_the_tables_under_the_views_it_reads() -> None:
    made = {p.stem for p in views_for({"unit_examples", "corpus_tokens", "subject_model"})}
    # examples_long's own tables exist, but sequences_long's (activation_records) does not.
    assert "examples_long" not in made and "sequences_long" not in made
    assert {"current_unit_examples", "current_top_k_examples", "top_k_examples", "top_tokens"} <= made
    assert "current_top_k_examples" not in {p.stem for p in views_for({"unit_examples"})}
    # A base table under a view's name (kept by a warehouse an older version also writes) stays.
    assert "top_k_examples" not in {p.stem for p in views_for({"unit_examples", "top_k_examples"})}


HAND_MADE = {"subject_model", "corpus_tokens", "activation_records", "unit_examples"}


def _hand_made(conn: duckdb.DuckDBPyConnection) -> None:
    """One neuron (layer 0, neuron 3) with one stored sequence, codes 0, 255, 51 on [-1, 4]: the
    activations are -1, 4 and -1 + 51 * 5 / 255 = 0. Its '+' unit peaks at 4, its '-' unit at 1."""
    conn.execute(f"create schema {SCHEMA}")
    conn.execute(f"create table {SCHEMA}.subject_model as select 'm' as model_id, 'r' as model_revision")
    conn.execute(
        f"create table {SCHEMA}.corpus_tokens as select 'm' as model_id, 'r' as model_revision, 9 as seq_id,"
        " ['a', 'b', 'c'] as tokens"
    )
    record = "{'rank': 0, 'seq_id': 9, 'bin': NULL::int}"
    conn.execute(
        f"create table {SCHEMA}.activation_records as select 'm' as model_id, 'r' as model_revision, 0 as layer,"
        f" 3 as neuron, [{record}] as top, [{record}] as bottom, [{record}] as random,"
        f" [{record}][1:0] as quantile, [{record}][1:0] as quantile_neg,"
        " [{'seq_id': 9, 'max_act': 4.0::float, 'min_act': -1.0::float, 'codes': [0, 255, 51]::utinyint[]}]"
        " as sequences"
    )
    conn.execute(
        f"create table {SCHEMA}.unit_examples as select 'm' as model_id, 'r' as model_revision, 0 as layer,"
        " 3 as neuron, p.polarity, p.max_activation,"
        " [{'kind': 'top', 'split': 'train', 'split_rank': 0, 'rank': 0, 'seq_id': 9}] as records,"
        " [{'token': 'b'}] as top_tokens"
        " from (values ('+', 4.0::float), ('-', 1.0::float)) p(polarity, max_activation)"
    )


def test_views_read_views_and_decode_by_hand(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        _hand_made(conn)
        created = create_views(conn)
        assert created.index("sequences_long") < created.index("examples_long")
        assert conn.execute(f"select acts from {SCHEMA}.sequences_long").fetchall() == [([-1.0, 4.0, 0.0],)]
        assert conn.execute(f"select record_list, acts from {SCHEMA}.records_long order by all").fetchall() == [
            (name, [-1.0, 4.0, 0.0]) for name in ("bottom", "random", "top")
        ]
        rows = conn.execute(
            f"select polarity, max_act, tokens, acts, levels from {SCHEMA}.examples_long order by polarity"
        ).fetchall()
        assert rows == [
            ("+", 4.0, ["a", "b", "c"], [-1.0, 4.0, 0.0], [0, 10, 0]),
            ("-", 1.0, ["a", "b", "c"], [-1.0, 4.0, 0.0], [10, 0, 0]),
        ]
        same = f"select * from {SCHEMA}.current_unit_examples except all select * from {SCHEMA}.current_top_k_examples"
        assert conn.execute(same).fetchall() == []
        assert conn.execute(f"select count(*) from {SCHEMA}.current_top_k_examples").fetchone() == (2,)


def test_made_in_name_order_a_view_misses_the_view_it_reads(tmp_path: Path) -> None:
    """Negative control: the plain name order that create_views used before fails on these files."""
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        _hand_made(conn)
        failed = {}
        for path in view_files():
            if view_requirements(path) <= HAND_MADE | {p.stem for p in view_files()}:
                try:
                    conn.execute(path.read_text())
                except duckdb.CatalogException as exc:
                    failed[path.stem] = str(exc)
    assert failed.keys() == {"current_top_k_examples", "examples_long", "records_long"}
    assert "current_unit_examples does not exist" in failed["current_top_k_examples"]
    assert "sequences_long does not exist" in failed["examples_long"]

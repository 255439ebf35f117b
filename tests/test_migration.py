"""A warehouse written by an older version, upgraded in place through real materializations:
top_k_examples is renamed unit_examples (its old name still reads it, as a view), unit_examples gains
its `polarity` column (old rows read '+'), and a table whose columns changed in another way is
refused with a message that says how to rebuild it, never silently truncated."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from conftest import query, run_stages
from tiny_models import write_signed_corpus, write_signed_model

from assets.config import ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, ExplainerResource, SimulatorResource, SubjectModelResource

STAGES = ["subject_model", "corpus_tokens", "activation_records", "unit_examples"]


def _resources(root: Path) -> dict:
    return {
        "subject": SubjectModelResource(model=str(write_signed_model(root / "model"))),
        "corpus": CorpusResource(source=str(write_signed_corpus(root / "signed.jsonl")), seq_len=16, n_sequences=32),
        "sampling": SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=1, batch_size=8),
    }


@pytest.fixture
def old_warehouse(tmp_path: Path) -> tuple[Path, dict]:
    """Both layers captured, then unit_examples made as an older version wrote it: '+' rows only,
    no polarity column."""
    database = tmp_path / "neuron_atlas.duckdb"
    resources = _resources(tmp_path)
    assert run_stages(database, 2, (0, 1), **resources, selection=STAGES).success
    with duckdb.connect(str(database)) as conn:
        conn.execute("drop view if exists atlas.examples_long")
        conn.execute("drop view if exists atlas.top_tokens")
        conn.execute("drop view if exists atlas.current_unit_examples")
        conn.execute("delete from atlas.unit_examples where polarity = '-'")
        conn.execute("alter table atlas.unit_examples drop column polarity")
    return database, resources


def test_an_old_table_gains_polarity_and_its_rows_read_plus(old_warehouse: tuple[Path, dict]) -> None:
    database, resources = old_warehouse
    # Rewriting layer 0 alone upgrades the table; layer 1 keeps its old rows.
    assert run_stages(database, 2, (0, 0), **resources, selection=["unit_examples"]).success
    q = query(database)
    assert q("select layer, polarity, count(*) from atlas.unit_examples group by all order by all") == [
        (0, "+", 16),
        (0, "-", 16),
        (1, None, 16),
    ]
    assert q("select layer, polarity, count(distinct neuron) from atlas.examples_long group by all order by all") == [
        (0, "+", 16),
        (0, "-", 16),
        (1, "+", 16),
    ]
    assert q("select distinct polarity from atlas.top_tokens where layer = 1") == [("+",)]


def _refused(database: Path, resources: dict) -> str:
    """Materialize layer 0 of activation_records, which must fail: the failure's message."""
    result = run_stages(database, 2, (0, 0), **resources, selection=["activation_records"], raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    return message + failure.step_failure_data.error.message


def test_a_table_whose_columns_changed_otherwise_is_refused(old_warehouse: tuple[Path, dict]) -> None:
    database, resources = old_warehouse
    with duckdb.connect(str(database)) as conn:  # a struct without a field the new rows carry
        conn.execute("alter table atlas.activation_records drop column bottom")
        conn.execute("alter table atlas.activation_records add column bottom integer[]")
        before = conn.execute("select count(*) from atlas.activation_records").fetchone()
    message = _refused(database, resources)
    assert "atlas.activation_records was written by another version" in message
    assert "bottom INTEGER[] -> STRUCT(" in message and "drop table atlas.activation_records" in message
    assert query(database)("select count(*) from atlas.activation_records") == [before]  # nothing lost


def test_a_float32_record_table_is_refused_not_truncated(old_warehouse: tuple[Path, dict]) -> None:
    """activation_records written before records were stored in 8 bits (float32 `acts` in each
    record struct, no `sequences`) is refused with the columns that changed; its rows stay as they were."""
    database, resources = old_warehouse
    old_struct = "STRUCT(rank SMALLINT, seq_id INTEGER, max_act FLOAT, acts FLOAT[], min_act FLOAT)[]"
    acts = "list_filter(sequences, lambda s: s.seq_id = r.seq_id)[1]"
    with duckdb.connect(str(database)) as conn:
        for view in ("records_long", "examples_long", "current_activation_records"):
            conn.execute(f"drop view if exists atlas.{view}")
        conn.execute(
            "create table atlas.old_records as select * exclude (sequences) replace (list_transform(top, lambda r:"
            f" {{rank: r.rank, seq_id: r.seq_id, max_act: {acts}.max_act,"
            f" acts: list_transform({acts}.codes, lambda c: c::float), min_act: {acts}.min_act}})::{old_struct} as top)"
            " from atlas.activation_records"
        )
        conn.execute("drop table atlas.activation_records")
        conn.execute("alter table atlas.old_records rename to activation_records")
        before = conn.execute("select top from atlas.activation_records order by layer, neuron").fetchall()
    message = _refused(database, resources)
    assert "acts FLOAT[]" in message and "new sequences" in message and "drop table atlas.activation_records" in message
    assert query(database)("select top from atlas.activation_records order by layer, neuron") == before


def _renamed_back(database: Path) -> list[tuple]:
    """Make the warehouse as a version before `unit_examples` was renamed left it: the table under its
    old name `top_k_examples`, and the views over it that version made. Returns its rows."""
    with duckdb.connect(str(database)) as conn:
        for view in (
            "examples_long",
            "top_tokens",
            "current_unit_examples",
            "top_k_examples",
            "current_top_k_examples",
        ):
            conn.execute(f"drop view if exists atlas.{view}")
        conn.execute("alter table atlas.unit_examples rename to top_k_examples")
        conn.execute("create view atlas.current_top_k_examples as select * from atlas.top_k_examples")
        return conn.execute(f"select * from atlas.top_k_examples order by {UNIT_ORDER}").fetchall()


UNIT_ORDER = "layer, neuron, polarity"
EXAMPLE_RELATIONS = (
    "select table_name, table_type from information_schema.tables"
    " where table_schema = 'atlas' and table_name like '%examples%' order by 1"
)
RENAMED = [
    ("current_top_k_examples", "VIEW"),
    ("current_unit_examples", "VIEW"),
    ("examples_long", "VIEW"),
    ("top_k_examples", "VIEW"),
    ("unit_examples", "BASE TABLE"),
]


def test_an_old_top_k_examples_table_is_renamed_on_the_next_write(tmp_path: Path) -> None:
    """top_k_examples (the old name) becomes unit_examples in place: the layer not rewritten keeps its
    rows, and the old name still reads them, as a view."""
    database, resources = tmp_path / "neuron_atlas.duckdb", _resources(tmp_path)
    assert run_stages(database, 2, (0, 1), **resources, selection=STAGES).success
    q = query(database)
    kept = q(f"select * from atlas.unit_examples where layer = 1 order by {UNIT_ORDER}")
    before = _renamed_back(database)
    assert run_stages(database, 2, (0, 0), **resources, selection=["unit_examples"]).success
    assert q(EXAMPLE_RELATIONS) == RENAMED
    assert q(f"select * from atlas.unit_examples where layer = 1 order by {UNIT_ORDER}") == kept
    rows = q(f"select * from atlas.unit_examples order by {UNIT_ORDER}")
    assert len(rows) == len(before)
    assert q(f"select * from atlas.top_k_examples order by {UNIT_ORDER}") == rows
    assert q(f"select * from atlas.current_top_k_examples order by {UNIT_ORDER}") == rows
    assert q("select count(*) from atlas.examples_long")[0][0] > 0


@pytest.mark.slow
def test_an_old_top_k_examples_table_is_renamed_before_a_step_reads_it(tmp_path: Path) -> None:
    """A step downstream of unit_examples that runs first on an old warehouse reads the table under
    its new name: the IO manager upgrades the warehouse before its first read, not only on writes."""
    database, resources = tmp_path / "neuron_atlas.duckdb", _resources(tmp_path)
    assert run_stages(database, 2, (0, 1), **resources, selection=STAGES).success
    before = _renamed_back(database)
    explain = ExplainConfig(n_neurons=1, samples=1, temperature=0.0)
    llm = {"explainer": ExplainerResource(), "simulator": SimulatorResource()}
    assert run_stages(database, 2, (0, 0), **resources, **llm, explain=explain, selection=["explanations"]).success
    q = query(database)
    assert q(EXAMPLE_RELATIONS) == RENAMED
    assert q(f"select * from atlas.unit_examples order by {UNIT_ORDER}") == before
    assert q("select count(distinct polarity) from atlas.explanations where layer = 0 and neuron = 0") == [(2,)]

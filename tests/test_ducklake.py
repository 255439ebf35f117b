"""The DuckLake warehouse on a real PostgreSQL catalog (started by the test on 127.0.0.1): the
packaged extensions load offline, readers never wait for writers, a write that loses a commit
race is retried whole (and fails cleanly without retries), the views and example queries give
the same answers as on a DuckDB file, and the LLM response cache can live in the same Postgres."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import polars as pl
import pytest
from conftest import run_stages
from dagster import DagsterInstance, StaticPartitionsDefinition, asset, materialize
from postgres_server import PostgresServer, postgres_server
from test_warehouse_lock import _hold

from assets.config import SamplingConfig
from assets.io import TransactionalDuckDbClient, WarehouseIOManager
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.infra import llm_cache
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.warehouse import (
    SCHEMA,
    WarehouseBusy,
    create_views,
    extension_file,
    lake_catalog,
    open_warehouse,
    retry_on_conflict,
    views_for,
)

QUERIES = Path(__file__).resolve().parents[1] / "warehouse" / "queries"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def lake(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> str:
    """A fresh DuckLake (its own catalog database, data files under tmp_path) as NEURON_ATLAS_DB."""
    name = f"lake_{secrets.token_hex(6)}"
    conninfo = postgres.create_database(name)
    for key, value in postgres.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NEURON_ATLAS_DATA_PATH", str(tmp_path / "lake_data"))
    database = f"ducklake:postgres:{conninfo}"
    monkeypatch.setenv("NEURON_ATLAS_DB", database)
    return database


def _layers_table(database: str, rows_per_layer: int = 500) -> None:
    with open_warehouse(database) as conn:
        conn.execute(f"create schema if not exists {SCHEMA}")
        conn.execute(
            f"create table {SCHEMA}.t as select (i % 2)::int as layer, i as n, 'old' as v from range(?) r(i)",
            [2 * rows_per_layer],
        )


def _rewrite(conn: duckdb.DuckDBPyConnection, layer: int, value: str, rows: int = 500) -> None:
    """One partition write as the IO manager does it: delete the layer's rows, insert the new ones."""
    conn.execute(f"delete from {SCHEMA}.t where layer = ?", [layer])
    conn.execute(f"insert into {SCHEMA}.t select ?, i, ? from range(?) r(i)", [layer, value, rows])


def _layer_values(database: str) -> list[tuple]:
    with open_warehouse(database, read_only=True) as conn:
        return conn.execute(
            f"select layer, v, count(*), count(distinct n) from {SCHEMA}.t group by all order by all"
        ).fetchall()


def test_extensions_load_from_the_packaged_files_with_downloads_off(tmp_path: Path) -> None:
    empty = tmp_path / "no_extensions_here"
    empty.mkdir()
    settings = {"autoinstall_known_extensions": False, "extension_directory": str(empty)}
    with duckdb.connect(config=settings) as conn:
        with pytest.raises(duckdb.Error):  # negative control: nothing else would provide it
            conn.execute("LOAD ducklake")
    with duckdb.connect(config=settings) as conn:
        for name in ("postgres_scanner", "ducklake"):
            path = extension_file(name)
            assert "site-packages" in path.parts and path.parent.name == f"v{duckdb.__version__}"
            conn.execute(f"LOAD '{path}'")
        loaded = {r[0] for r in conn.execute("select extension_name from duckdb_extensions() where loaded").fetchall()}
    assert {"ducklake", "postgres_scanner"} <= loaded


def test_bad_locations_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="holds a password"):
        lake_catalog("ducklake:postgres:host=db dbname=atlas password=hunter2")
    with pytest.raises(ValueError, match="holds a password"):
        lake_catalog("ducklake:postgres:postgresql://atlas:hunter2@db/atlas")
    with pytest.raises(ValueError, match="unsupported DuckLake catalog"):
        lake_catalog("ducklake:sqlite:/tmp/meta.sqlite")
    with pytest.raises(ValueError, match="holds a password"):
        LLMCache("postgresql://atlas:hunter2@db/atlas")
    assert lake_catalog("ducklake:postgres: host=db dbname=atlas ") == "host=db dbname=atlas"


def test_a_new_lake_without_a_data_path_is_a_clear_error(lake: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURON_ATLAS_DATA_PATH")
    with pytest.raises(RuntimeError, match="set NEURON_ATLAS_DATA_PATH"):
        with open_warehouse(lake):
            pass
    with pytest.raises(RuntimeError, match="materialize something before reading it"):
        with open_warehouse(lake, read_only=True):
            pass


def test_readers_and_writers_never_wait_for_each_other(lake: str, tmp_path: Path) -> None:
    _layers_table(lake)
    # A notebook holding a read transaction open, then a writer: neither waits for the other.
    with open_warehouse(lake, read_only=True, wait_s=0.5) as notebook, open_warehouse(lake, wait_s=0.5) as writer:
        notebook.begin()
        assert notebook.execute(f"select count(*) from {SCHEMA}.t where v = 'old'").fetchone() == (1000,)
        writer.begin()
        _rewrite(writer, 0, "new")
        with open_warehouse(lake, read_only=True, wait_s=0.5) as reader:  # during the write: the last commit
            assert reader.execute(f"select count(*) from {SCHEMA}.t where v = 'new'").fetchone() == (0,)
        writer.commit()
        # The open transaction keeps its snapshot; a new reader sees the whole new layer.
        assert notebook.execute(f"select count(*) from {SCHEMA}.t where v = 'old'").fetchone() == (1000,)
        notebook.commit()
    assert _layer_values(lake) == [(0, "new", 500, 500), (1, "old", 500, 500)]

    # Negative control: on a DuckDB file a writer in another process makes the reader wait (and give up here).
    path = tmp_path / "neuron_atlas.duckdb"
    _layers_table(str(path))
    holder = _hold(path, "pipeline", 3)
    with pytest.raises(WarehouseBusy):
        with open_warehouse(str(path), read_only=True, wait_s=0.5):
            pass
    holder.wait(timeout=30)


def test_a_write_that_loses_a_commit_race_is_retried_whole(lake: str) -> None:
    """What DuckLake does: a transaction that deleted from and inserted into a table fails to commit
    when another one did the same to that table meanwhile, even for other rows (another layer)."""
    _layers_table(lake)
    tries: list[int] = []

    def write_layer_1() -> None:
        tries.append(1)
        with open_warehouse(lake) as mine:
            mine.begin()
            _rewrite(mine, 1, f"new{len(tries)}")
            if len(tries) == 1:  # another machine rewrites layer 0 and commits first
                with open_warehouse(lake) as other:
                    other.begin()
                    _rewrite(other, 0, "other")
                    other.commit()
            mine.commit()

    retry_on_conflict(write_layer_1, attempts=3)
    assert len(tries) == 2
    assert _layer_values(lake) == [(0, "other", 500, 500), (1, "new2", 500, 500)]

    # Negative control: without a second try the conflict surfaces, and nothing of it was committed.
    tries.clear()
    with pytest.raises(RuntimeError, match="conflicted with other writers 1 times"):
        retry_on_conflict(write_layer_1, attempts=1)
    assert _layer_values(lake) == [(0, "other", 500, 500), (1, "new2", 500, 500)]


@asset(
    partitions_def=StaticPartitionsDefinition(["0", "1"]),
    io_manager_key="warehouse",
    metadata={"partition_expr": "layer"},
)
def layered(context) -> pl.DataFrame:  # noqa: ANN001
    layer = int(context.partition_key)
    return pl.DataFrame({"layer": [layer] * 300, "n": list(range(300)), "v": ["v2"] * 300})


def _materialize_layer(database: str, layer: str, instance: DagsterInstance | None = None):  # noqa: ANN202
    return materialize(
        [layered],
        partition_key=layer,
        resources={"warehouse": WarehouseIOManager(database=database, schema=SCHEMA)},
        instance=instance or DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


@pytest.mark.parametrize("attempts", [20, 1])
def test_the_io_manager_retries_a_conflicting_partition_write(
    lake: str, monkeypatch: pytest.MonkeyPatch, attempts: int
) -> None:
    """A real materialization whose write conflicts once with another writer's committed rewrite of
    the other layer: it is written again and recorded once; with one attempt it fails and the
    partition keeps its old rows (the delete was rolled back)."""
    assert _materialize_layer(lake, "0").success and _materialize_layer(lake, "1").success
    with open_warehouse(lake) as conn:
        conn.execute(f"update {SCHEMA}.layered set v = 'v1'")
    monkeypatch.setenv("NEURON_ATLAS_COMMIT_ATTEMPTS", str(attempts))
    original = TransactionalDuckDbClient.delete_table_slice
    injected: list[bool] = []

    def delete_then_race(context, table_slice, connection) -> None:  # noqa: ANN001
        original(context, table_slice, connection)
        if not injected:  # fault injection: another writer commits a rewrite of layer 0 now
            injected.append(True)
            with open_warehouse(lake) as other:
                other.begin()
                other.execute(f"delete from {SCHEMA}.layered where layer = 0")
                other.execute(f"insert into {SCHEMA}.layered select 0, i, 'other' from range(300) r(i)")
                other.commit()

    monkeypatch.setattr(TransactionalDuckDbClient, "delete_table_slice", staticmethod(delete_then_race))
    instance = DagsterInstance.ephemeral()
    result = _materialize_layer(lake, "1", instance)
    with open_warehouse(lake, read_only=True) as conn:
        rows = conn.execute(
            f"select layer, v, count(*), count(distinct n) from {SCHEMA}.layered group by all order by all"
        ).fetchall()
    logs = "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))
    if attempts > 1:
        assert result.success
        assert rows == [(0, "other", 300, 300), (1, "v2", 300, 300)]
        assert "DuckLake commit conflict (try 1 of 20)" in logs
        (mat,) = result.asset_materializations_for_node("layered")
        assert mat.metadata["row_count"].value == 300
    else:
        assert not result.success
        assert rows == [(0, "other", 300, 300), (1, "v1", 300, 300)]


def test_views_and_example_queries_give_the_same_answers_on_a_file_and_a_lake(
    lake: str, tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    resources = {
        "subject": SubjectModelResource(model=str(digit_model_dir)),
        "corpus": CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=40, seed=3),
        "sampling": SamplingConfig(top_k=8, random_k=8, quantile_bins=2, per_quantile=2),
    }
    path = tmp_path / "neuron_atlas.duckdb"
    for database in (lake, str(path)):
        assert run_stages(database, n_layers=2, layers=(0, 1), **resources).success  # type: ignore[arg-type]

    def answers(database: str) -> dict[str, list]:
        out = {}
        with open_warehouse(database, read_only=True) as conn:
            tables = {
                r[0]
                for r in conn.execute(
                    "select table_name from information_schema.tables"
                    " where table_schema = ? and table_type = 'BASE TABLE'",
                    [SCHEMA],
                ).fetchall()
            }
            for view in views_for(tables):
                columns = [r[0] for r in conn.execute(f"describe {SCHEMA}.{view.stem}").fetchall()]
                keep = ", ".join(c for c in columns if c != "run_id")
                out[view.stem] = conn.execute(f"select {keep} from {SCHEMA}.{view.stem} order by all").fetchall()
            for query in sorted(QUERIES.glob("*.sql")):
                sql = query.read_text()
                if all(f"atlas.{t}" not in sql for t in ("explanations", "scores", "ablations", "simulations")):
                    out[query.name] = conn.execute(sql).fetchall()
        return out

    on_lake, on_file = answers(lake), answers(str(path))
    assert {"records_long", "examples_long", "top_tokens", "most_active_neurons.sql"} <= set(on_lake)
    assert on_lake.keys() == on_file.keys()
    for name in on_lake:
        assert on_lake[name], name
        assert on_lake[name] == on_file[name], name
    # Negative control: the comparison sees a difference when there is one.
    with open_warehouse(lake) as conn:
        conn.execute(f"update {SCHEMA}.unit_examples set max_activation = max_activation + 1 where neuron = 0")
    assert answers(lake)["examples_long"] != on_file["examples_long"]


def test_views_are_redefined_on_a_lake_only_when_their_file_changes(lake: str) -> None:
    _layers_table(lake)
    with open_warehouse(lake) as conn:
        conn.execute(
            f"create table {SCHEMA}.corpus_tokens as select 1 as seq_id, 'm' as model_id, 'r' as model_revision"
        )
        conn.execute(f"create table {SCHEMA}.subject_model as select 'm' as model_id, 'r' as model_revision")
        first = create_views(conn, only_changed=True)
        again = create_views(conn, only_changed=True)
        conn.execute(f"comment on view {SCHEMA}.current_corpus_tokens is 'an older file'")
        changed = create_views(conn, only_changed=True)
        assert conn.execute(f"select count(*) from {SCHEMA}.current_corpus_tokens").fetchone() == (1,)
    assert first == ["current_corpus_tokens"] and again == [] and changed == ["current_corpus_tokens"]


def test_the_llm_cache_in_postgres_is_shared_and_is_the_lakes_default(
    lake: str, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEURON_ATLAS_LLM_CACHE")  # set by conftest for every test
    default = llm_cache.default_cache_path()
    assert default == "postgres:" + lake_catalog(lake)
    machine_a, machine_b = LLMCache(default), LLMCache(postgres.url(lake_catalog(lake).split("dbname=")[1]))
    assert machine_b.get("b", "m", "complete", "p", {"t": 0}) is None

    def put(i: int) -> None:
        machine_a.put("b", "m", "complete", f"p{i % 7}", {"t": 0}, {"text": f"answer {i % 7}"})

    threads = [threading.Thread(target=put, args=(i,)) for i in range(28)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert machine_b.get("b", "m", "complete", "p3", {"t": 0}) == {"text": "answer 3"}
    assert machine_b.get("b", "m", "complete", "p3", {"t": 1}) is None  # other parameters: another key
    assert len(machine_b) == 7 and machine_b.count("complete") == 7 and machine_b.count("simulate") == 0
    assert "hunter" not in repr(machine_a)


def test_a_layer_committed_ahead_of_its_step_output_on_a_lake(lake: str) -> None:
    """`write_partition` (a multi-layer step committing each finished layer) on a DuckLake creates
    the table, replaces exactly the layer it is given, and the step's output later rewrites that
    partition with every row once."""
    manager = WarehouseIOManager(database=lake, schema=SCHEMA).create_io_manager(None)

    def frame(layer: int, value: str) -> pl.DataFrame:
        return pl.DataFrame({"layer": [layer] * 300, "n": list(range(300)), "v": [value] * 300})

    def values() -> list[tuple]:
        with open_warehouse(lake, read_only=True) as conn:
            sql = f"select layer, v, count(*), count(distinct n) from {SCHEMA}.layered group by all order by all"
            return conn.execute(sql).fetchall()

    manager.write_partition("layered", 0, frame(0, "early"), log=print)
    manager.write_partition("layered", 1, frame(1, "early"), log=print)
    manager.write_partition("layered", 0, frame(0, "again"), log=print)
    assert values() == [(0, "again", 300, 300), (1, "early", 300, 300)]
    assert _materialize_layer(lake, "0").success
    assert values() == [(0, "v2", 300, 300), (1, "early", 300, 300)]

"""The DuckDB IO manager of dagster-duckdb-polars, made transactional.

Dagster's DuckDB client deletes a partition's rows and inserts the new ones in autocommit mode,
so a failure between the two loses the partition. Here both run in one transaction, together
with refreshing the SQL views, under the warehouse lock (`pipeline.infra.warehouse.open_warehouse`), so
concurrent runs and multiprocess steps take turns instead of failing on DuckDB's file lock.

On a DuckLake warehouse (`ducklake:postgres:...`) there is no lock: writers on many machines
commit optimistically, and a write whose commit conflicts with another writer's (DuckLake counts
any two writes that delete from and insert into one table) is run again whole, from the same
in-memory frame, a bounded number of times (`pipeline.infra.warehouse.retry_on_conflict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import duckdb
import polars as pl
from dagster import InputContext, OutputContext

# Private on purpose: dagster 1.13 exports neither DbIOManager nor TableSlice publicly (dagster-duckdb
# itself imports them from dagster._core), and _get_cleanup_statement is dagster-duckdb's own helper.
# pyproject.toml bounds dagster <1.14 and dagster-duckdb <0.30 for that reason; check these imports
# before raising the bounds.
from dagster._core.storage.db_io_manager import DbIOManager, TableSlice
from dagster_duckdb.io_manager import DuckDbClient, _get_cleanup_statement
from dagster_duckdb_polars import DuckDBPolarsIOManager, DuckDBPolarsTypeHandler
from pydantic import Field

from pipeline.core.errors import AtlasInputError
from pipeline.infra.warehouse import create_views, is_lake, open_warehouse, retry_on_conflict, upgrade_tables

# Set while a DuckLake write is being tried again after a commit conflict.
_RETRYING: ContextVar[bool] = ContextVar("warehouse_write_retrying", default=False)


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Commit what the block did, or roll it all back."""
    conn.begin()
    try:
        yield conn
        conn.commit()
    except BaseException:
        try:
            conn.rollback()
        except duckdb.TransactionException:
            pass  # a commit that failed (a DuckLake conflict) has ended the transaction already
        raise


class TransactionalDuckDbClient(DuckDbClient):
    @staticmethod
    def delete_table_slice(context: OutputContext, table_slice: TableSlice, connection: Any) -> None:
        # The parent swallows "no such table", which would abort our transaction: ask first.
        exists = connection.execute(
            "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
            [table_slice.schema, table_slice.table],
        ).fetchone()[0]
        if exists:
            connection.execute(_get_cleanup_statement(table_slice))

    @staticmethod
    @contextmanager
    def connect(context: InputContext | OutputContext, _table_slice: TableSlice) -> Iterator[Any]:
        config = context.resource_config
        database = config["database"]
        with open_warehouse(database, config=config["connection_config"], data_path=config.get("data_path")) as conn:
            with transaction(conn):
                yield conn
                if isinstance(context, OutputContext):
                    create_views(conn, only_changed=is_lake(database))


class PolarsTypeHandler(DuckDBPolarsTypeHandler):
    """Reads through Arrow tables (the upstream handler calls `.arrow()`, gone in DuckDB 2). A
    write retried after a DuckLake conflict skips the upstream handler's metadata, which the first
    try recorded already (Dagster refuses the same key twice)."""

    def handle_output(
        self, context: OutputContext, table_slice: TableSlice, obj: pl.DataFrame, connection: Any
    ) -> None:
        if not _RETRYING.get() or "row_count" not in context.get_logged_metadata():
            super().handle_output(context, table_slice, obj, connection)
            return
        # A DuckLake write tried again after a conflict: the upstream handler's SQL, without its metadata.
        if not obj.is_empty():
            obj_arrow = obj.to_arrow()  # noqa: F841 (read by name in the SQL below)
            target = f"{table_slice.schema}.{table_slice.table}"
            connection.execute(f"create schema if not exists {table_slice.schema}")
            connection.execute(f"create table if not exists {target} as select * from obj_arrow")
            if not connection.fetchall():  # the table was there already
                connection.execute(f"insert into {target} select * from obj_arrow")

    def load_input(self, context: InputContext, table_slice: TableSlice, connection: Any) -> pl.DataFrame:
        if table_slice.partition_dimensions and len(context.asset_partition_keys) == 0:
            return pl.DataFrame()
        relation = connection.sql(TransactionalDuckDbClient.get_select_statement(table_slice))
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow  # DuckDB 2 / 1.x
        return pl.from_arrow(fetch())


def _migrate(connection: Any, target: str, obj: pl.DataFrame) -> None:
    """Bring a table written by an older version up to the frame's columns, or refuse clearly.

    Inserts are positional, so a table may only gain columns at its end: new columns are added
    (NULL in the old rows; readers treat a NULL `polarity` as '+'). Any other difference, such as a
    changed column type or a struct with new fields (which an insert would silently truncate),
    needs the table rebuilt."""
    schema, table = target.split(".", 1)
    exists = connection.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?", [schema, table]
    ).fetchone()[0]
    if not exists:
        return
    obj_arrow = obj.head(0).to_arrow()  # noqa: F841 (read by name in the SQL below)
    wanted = [(r[0], r[1]) for r in connection.execute("describe select * from obj_arrow").fetchall()]
    have = [(r[0], r[1]) for r in connection.execute(f"describe {target}").fetchall()]
    if wanted == have:
        return
    if wanted[: len(have)] == have:
        for name, kind in wanted[len(have) :]:
            connection.execute(f'alter table {target} add column "{name}" {kind}')
        return
    old, new = dict(have), dict(wanted)
    changes = [f"{name} {old[name]} -> {new[name]}" for name in new if name in old and old[name] != new[name]]
    changes += [f"new {name}" for name in new if name not in old] + [f"gone {name}" for name in old if name not in new]
    if not changes:
        changes = ["the columns are in another order"]
    listed = "; ".join(c if len(c) < 200 else c[:200] + "..." for c in changes)
    raise AtlasInputError(
        f"{target} was written by another version of Neuron Atlas and its columns differ ({listed}):"
        f" rebuild it (`drop table {target}`, then materialize all its partitions again; see the README, Migrating)"
    )


class WarehouseDbIOManager(DbIOManager):
    """Exposes the database file, so asset checks can query the warehouse the assets wrote; on a
    DuckLake, retries a write transaction that lost a commit race to another writer; lets a
    multi-layer step commit each layer as it finishes (`write_partition`)."""

    def __init__(self, *, connection_config: dict[str, Any], data_path: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connection_config, self._data_path = connection_config, data_path
        self._upgraded = False  # the tables brought up to date (`upgrade_tables`) by this instance

    def load_input(self, context: InputContext) -> object:
        """Upgrade an older warehouse before its first read, so a table renamed since is read
        under its new name even when a step reads before anything is written."""
        if not self._upgraded:

            def attempt() -> None:
                with self._connect() as conn, transaction(conn):
                    upgrade_tables(conn)

            retry_on_conflict(attempt, log=context.log.warning)
            self._upgraded = True
        return super().load_input(context)

    @property
    def database(self) -> str:
        return self._database

    def _connect(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        return open_warehouse(self._database, config=self._connection_config, data_path=self._data_path)

    def write_partition(self, table: str, layer: int, frame: pl.DataFrame, log: Callable[[str], None]) -> None:
        """Replace one layer's rows of `table` now, in one transaction, ahead of the step's output.

        A step that works through several layers calls this as each one finishes, so a crash or a
        kill later in the step loses only the unfinished layers; the step's output at the end
        rewrites the same rows (delete and insert of the same partition)."""
        if frame.is_empty():
            return
        target = f"{self._schema}.{table}"

        def attempt() -> None:
            self._upgrade(target, frame)
            obj_arrow = frame.to_arrow()  # noqa: F841 (read by name in the SQL below)
            with self._connect() as conn, transaction(conn):
                conn.execute(f"create schema if not exists {self._schema}")
                exists = conn.execute(
                    "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                    [self._schema, table],
                ).fetchone()[0]
                if exists:
                    conn.execute(f"delete from {target} where layer = ?", [layer])
                    conn.execute(f"insert into {target} select * from obj_arrow")
                else:
                    conn.execute(f"create table {target} as select * from obj_arrow")
                create_views(conn, only_changed=is_lake(self._database))

        retry_on_conflict(attempt, log=log)

    def handle_output(self, context: OutputContext, obj: object) -> None:
        if not is_lake(self._database):
            self._migrate(context, obj)
            super().handle_output(context, obj)
            return
        tries = 0

        def attempt() -> None:
            nonlocal tries
            token = _RETRYING.set(tries > 0)
            tries += 1
            try:
                self._migrate(context, obj)
                super(WarehouseDbIOManager, self).handle_output(context, obj)
            finally:
                _RETRYING.reset(token)

        retry_on_conflict(attempt, log=context.log.warning)

    def _migrate(self, context: OutputContext, obj: object) -> None:
        """Upgrade (or refuse) the target table in a transaction of its own: DuckDB cannot alter a
        table in the transaction that deletes the partition's old rows."""
        if not isinstance(obj, pl.DataFrame) or obj.is_empty():
            return
        table_slice = self._get_table_slice(context, context)
        self._upgrade(f"{table_slice.schema}.{table_slice.table}", obj)

    def _upgrade(self, target: str, frame: pl.DataFrame) -> None:
        """Bring `target` up to the frame's columns (or refuse) in a transaction of its own: DuckDB
        cannot alter a table in the transaction that deletes from it. The views are refreshed by
        the write that follows."""
        with self._connect() as conn, transaction(conn):
            upgrade_tables(conn)
            _migrate(conn, target, frame)
        self._upgraded = True


class WarehouseIOManager(DuckDBPolarsIOManager):
    """Polars DataFrames <-> DuckDB tables; each partition write is one transaction. `database` is
    a DuckDB file or `ducklake:postgres:<libpq connection string>`."""

    data_path: str | None = Field(
        None,
        description="DuckLake only: the shared directory for the data files (the same path on every machine),"
        " needed when the lake is created; default: $NEURON_ATLAS_DATA_PATH",
    )

    def create_io_manager(self, context: Any) -> DbIOManager:
        return WarehouseDbIOManager(
            connection_config=self.connection_config,
            data_path=self.data_path,
            db_client=TransactionalDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=[PolarsTypeHandler()],
            default_load_type=self.default_load_type(),
            io_manager_name="WarehouseIOManager",
        )

"""The DuckDB IO manager of dagster-duckdb-polars, made transactional.

Dagster's DuckDB client deletes a partition's rows and inserts the new ones in autocommit mode,
so a failure between the two loses the partition. Here both run in one transaction, together
with refreshing the SQL views, under the warehouse lock (`pipeline.warehouse.open_warehouse`), so
concurrent runs and multiprocess steps take turns instead of failing on DuckDB's file lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import polars as pl
from dagster import InputContext, OutputContext
from dagster._core.storage.db_io_manager import DbIOManager, TableSlice
from dagster_duckdb.io_manager import DuckDbClient, _get_cleanup_statement
from dagster_duckdb_polars import DuckDBPolarsIOManager, DuckDBPolarsTypeHandler

from pipeline.warehouse import create_views, open_warehouse


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
        with open_warehouse(config["database"], config=config["connection_config"]) as conn:
            conn.begin()
            try:
                yield conn
                if isinstance(context, OutputContext):
                    create_views(conn)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise


class PolarsTypeHandler(DuckDBPolarsTypeHandler):
    """Reads through Arrow tables: the upstream handler calls `.arrow()`, gone in DuckDB 2."""

    def load_input(self, context: InputContext, table_slice: TableSlice, connection: Any) -> pl.DataFrame:
        if table_slice.partition_dimensions and len(context.asset_partition_keys) == 0:
            return pl.DataFrame()
        relation = connection.sql(TransactionalDuckDbClient.get_select_statement(table_slice))
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow  # DuckDB 2 / 1.x
        return pl.from_arrow(fetch())


class WarehouseDbIOManager(DbIOManager):
    """Exposes the database file, so asset checks can query the warehouse the assets wrote."""

    @property
    def database(self) -> str:
        return self._database


class WarehouseIOManager(DuckDBPolarsIOManager):
    """Polars DataFrames <-> DuckDB tables; each partition write is one transaction."""

    def create_io_manager(self, context: Any) -> DbIOManager:
        return WarehouseDbIOManager(
            db_client=TransactionalDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=[PolarsTypeHandler()],
            default_load_type=self.default_load_type(),
            io_manager_name="WarehouseIOManager",
        )

"""What the asset modules share: the decorator arguments every atlas asset repeats, lineage and
identity columns, the layer a step works on, early per-layer commits and the markdown previews of
the materialization pages. Asset modules import these public names from here, never each other's
private helpers."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetMaterialization,
    BackfillPolicy,
    DataVersion,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    TableColumn,
    TableSchema,
)

from assets.automation import RERUN
from assets.io import WarehouseDbIOManager
from pipeline.core.errors import AtlasInputError
from pipeline.core.models import ModelIdentity
from pipeline.core.units import RECORD_COLUMNS

# The IO manager (resource key) that stores each asset as one warehouse table.
WAREHOUSE = "warehouse"
GROUP = "atlas"
# Layer-partitioned tables keep the partition in their `layer` column.
LAYER_METADATA = {"partition_expr": "layer"}
# What the interpretation steps read of activation_records: the lists unit_examples refers to and
# their sequences' activations (`pipeline.core.units.units_from_frames`).
RECORD_ACTS = AssetIn(metadata={"columns": RECORD_COLUMNS})
# The Dagster pool of the steps that call the explainer/simulator: its limit (`dagster instance
# concurrency set llm N`, or `concurrency.pools.default_limit` in dagster.yaml) bounds the requests
# all runs on all machines send at once to the LLM servers.
LLM_POOL = "llm"
# The columns `with_lineage` puts before every row.
LINEAGE_COLUMNS = ("model_id", "model_revision", "run_id", "code_version")
LINEAGE_DOCS = {
    "model_id": "the subject model (Hugging Face id or local path)",
    "model_revision": "its checkpoint: the commit, or a hash of the weights' files",
    "run_id": "the Dagster run that wrote the row",
    "code_version": "the asset's code version when the row was written",
}
# Columns that say how a row was obtained (from the response cache, for how many tokens), not what
# it says: left out of the data version, so a rerun answered from the cache changes nothing.
BOOKKEEPING_COLUMNS = (
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "control_prompt_tokens",
    "control_completion_tokens",
)


def layer_partitions(n_layers: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition([str(i) for i in range(n_layers)])


def column_schema(columns: Mapping[str, Any], docs: Mapping[str, str] | None = None) -> TableSchema:
    """A table's columns as the Dagster UI lists them (the asset's Columns tab): the lineage
    columns `with_lineage` puts first, then `columns` (name -> polars dtype), each with what it
    means where `docs` says."""
    typed = {name: pl.String for name in LINEAGE_COLUMNS} | dict(columns)
    docs = {**LINEAGE_DOCS, **(docs or {})}
    if unknown := sorted(docs.keys() - typed.keys()):
        raise KeyError(f"column docs for columns the table does not have: {unknown}")
    return TableSchema(
        columns=[TableColumn(name, str(dtype), description=docs.get(name)) for name, dtype in typed.items()]
    )


def atlas_asset_args(
    partitions_def: StaticPartitionsDefinition | None = None,
    *,
    in_warehouse: bool = True,
    columns: Mapping[str, Any] | None = None,
    column_docs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The `@asset` arguments the atlas assets share, so each `@asset` states only its own
    (code_version, deps, ins, pool, check_specs...). Every asset is in the `atlas` group and
    backfills all selected layers in one run. `in_warehouse`: its output is a warehouse table
    (partitioned by its `layer` column when `partitions_def` is given) and it reruns by `RERUN`;
    otherwise (the viewer) it writes elsewhere and states its own automation condition.
    `columns` (and `column_docs`): the table's schema, shown in the UI before it is materialized."""
    args: dict[str, Any] = {"group_name": GROUP, "backfill_policy": BackfillPolicy.single_run()}
    metadata: dict[str, Any] = {}
    if partitions_def is not None:
        args["partitions_def"] = partitions_def
    if in_warehouse:
        args |= {"io_manager_key": WAREHOUSE, "automation_condition": RERUN}
        if partitions_def is not None:
            metadata |= LAYER_METADATA
    if columns is not None:
        metadata["dagster/column_schema"] = column_schema(columns, column_docs)
    if metadata:
        args["metadata"] = metadata
    return args


def with_lineage(frame: pl.DataFrame, identity: ModelIdentity, context: AssetExecutionContext) -> pl.DataFrame:
    """Prefix every row with model id, revision, run id and the asset's code version."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    return frame.select(
        pl.lit(identity.model_id).alias("model_id"),
        pl.lit(identity.revision).alias("model_revision"),
        pl.lit(context.run.run_id).alias("run_id"),
        pl.lit(code_version, dtype=pl.String).alias("code_version"),
        pl.all(),
    )


def content_version(frame: pl.DataFrame, identity: ModelIdentity) -> DataVersion:
    """A hash of a step's rows (lineage and bookkeeping columns aside), its columns' names and
    types, and the model.

    Dagster's default data version hashes the code version and the inputs' versions, so a rerun
    with other settings (`activation_records.top_k`, the explainer's model, ...) kept the old version and
    left downstream looking fresh. Hashing the rows makes every setting that changes results part
    of the version, and only those: a rerun that writes the same rows (the same settings again, the
    LLM's answers from the response cache) keeps the version and marks nothing stale. Polars' row hash is stable
    within one polars version; after an upgrade the first rerun may mark downstream stale once."""
    frame = frame.drop(*BOOKKEEPING_COLUMNS, strict=False)
    digest = hashlib.sha256(f"{identity.data_version}\n{frame.schema}\n".encode())
    for seed in (0, 1):  # two 64-bit hashes per row
        digest.update(frame.hash_rows(seed=seed).to_numpy().tobytes())
    return DataVersion(digest.hexdigest()[:32])


def versioned_output(
    frame: pl.DataFrame,
    identity: ModelIdentity,
    context: AssetExecutionContext,
    metadata: Mapping[str, Any] | None = None,
) -> Output[pl.DataFrame]:
    """The step's table with lineage (`with_lineage`), versioned by its content (`content_version`).
    A multi-layer step gives every layer it wrote the same version."""
    return Output(
        with_lineage(frame, identity, context),
        data_version=content_version(frame, identity),
        metadata=dict(metadata) if metadata else None,
    )


def identity_of(frame: pl.DataFrame) -> ModelIdentity:
    """The model a stored frame was computed from (its first row's lineage columns)."""
    return ModelIdentity(frame["model_id"][0], frame["model_revision"][0])


def strip_lineage(frame: pl.DataFrame) -> pl.DataFrame:
    """A stored frame without its lineage columns, as `pipeline` takes it."""
    return frame.drop(*LINEAGE_COLUMNS, strict=False)


def require_same_model(recorded: ModelIdentity, current: ModelIdentity) -> None:
    if recorded != current:
        raise AtlasInputError(
            f"the configured model is {current.data_version} but subject_model holds {recorded.data_version}:"
            " materialize subject_model (and corpus_tokens) first"
        )


def partition_layers(context: AssetExecutionContext) -> list[int]:
    """The layers (partitions) this step works on, in order."""
    return sorted(int(key) for key in context.partition_keys)


def land_layer(
    context: AssetExecutionContext,
    warehouse: WarehouseDbIOManager,
    layer: int,
    frame: pl.DataFrame,
    identity: ModelIdentity,
) -> None:
    """Commit a finished layer of a multi-layer step now, and record that partition as
    materialized, so its rows are queryable (and the UI shows it) even if a later layer fails or
    the run is killed. The step's output at the end writes every layer again (the same rows); a
    one-layer step, or its last layer, is left to that output alone."""
    selected = partition_layers(context)
    if len(selected) < 2 or layer == selected[-1]:
        return
    table = context.asset_key.path[-1]
    warehouse.write_partition(table, layer, with_lineage(frame, identity, context), context.log.warning)
    context.log_event(
        AssetMaterialization(
            asset_key=context.asset_key,
            partition=str(layer),
            description="committed as soon as this layer was done; the step goes on with its other layers",
            metadata={"rows": frame.height},
        )
    )
    context.log.info(f"layer {layer}: {frame.height} rows committed")


def preview(frame: pl.DataFrame, columns: Sequence[str], rows: int = 10) -> MetadataValue:
    """The first rows of `columns` as a markdown table, for the materialization page."""
    head = frame.select(columns).head(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in head.iter_rows()]
    return MetadataValue.md("\n".join(lines))


def failure_reasons(frame: pl.DataFrame) -> MetadataValue:
    """Why rows failed, with counts: the run page says what went wrong without a query."""
    failed = frame.filter(pl.col("failure_reason").is_not_null())
    if failed.is_empty():
        return MetadataValue.md("no failures")
    counts = failed.group_by("failure_reason").agg(pl.len().alias("rows"), pl.col("neuron").unique().sort())
    counts = counts.sort("rows", descending=True).with_columns(
        pl.col("failure_reason").str.replace_all(r"[|\n]", " "),
        pl.col("neuron").cast(pl.List(pl.String)).list.join(", "),
    )
    return preview(counts.rename({"neuron": "neurons"}), ["failure_reason", "rows", "neurons"], 20)

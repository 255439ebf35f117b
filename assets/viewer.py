"""The `neuron_viewer` asset: a static HTML page and a data file per layer, a thin wrapper over
`pipeline.infra.viewer`."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from assets.automation import rerun_condition
from assets.common import atlas_asset_args, partition_layers
from pipeline.infra.viewer import DATA_FILE, load_layer, write_layer
from pipeline.infra.warehouse import open_warehouse, sidecar_dir


def viewer_root(database: str) -> Path:
    """The viewer lives beside the warehouse file (or a DuckLake's data path), so each warehouse has its own viewer."""
    return sidecar_dir(database) / "viewer"


def build_viewer_assets(layers_def: StaticPartitionsDefinition) -> list[AssetsDefinition]:
    @asset(
        code_version="2",
        automation_condition=rerun_condition(optional_deps=("ablations", "classification_scores")),
        deps=["unit_examples", "explanations", "simulations", "scores", "ablations", "classification_scores"],
        required_resource_keys={"warehouse"},
        **atlas_asset_args(layers_def, in_warehouse=False),
    )
    def neuron_viewer(context: AssetExecutionContext) -> MaterializeResult:
        """Static HTML per layer (open the file, no server): `layer_<n>/index.html`, an index sorted by
        score with search, and `layer_<n>/data.js`, from which the page shows, per explained neuron
        (`index.html#<neuron>`), its explanations, scores, true vs simulated token heatmaps, top tokens,
        ablation score (when ablated) and detection and fuzzing scores (when classified)."""
        database = context.resources.warehouse.database
        root = viewer_root(database)
        explained, units, data_bytes, indexes = 0, 0, 0, []
        for layer in partition_layers(context):
            with open_warehouse(database, read_only=True) as conn:
                data = load_layer(conn, layer)
            index = write_layer(data, root)
            indexes.append(index)
            size = (index.parent / DATA_FILE).stat().st_size
            n_units = sum(len(page.units) for page in data.neurons)
            explained, units, data_bytes = explained + len(data.neurons), units + n_units, data_bytes + size
            context.log.info(
                f"layer {layer}: {len(data.neurons)} neurons ({n_units} units), {DATA_FILE} {size / 1024:.1f} KiB"
                f" -> {index}"
            )
        metadata = {
            "index": MetadataValue.path(str(indexes[0])),
            "open": MetadataValue.url(indexes[0].as_uri()),
            "explained_neurons": explained,
            "units": units,
            "data_bytes": data_bytes,
        }
        if len(indexes) > 1:
            metadata["layer_indexes"] = MetadataValue.md("\n".join(f"- [{p}]({p.as_uri()})" for p in indexes))
        return MaterializeResult(metadata=metadata)

    return [neuron_viewer]

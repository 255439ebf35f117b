"""The code location: `dagster dev` and `dagster asset materialize` load `defs` from here.

The layer partitions come from the configured model's layer count, read from its config at load
time, so the model is chosen with NEURON_ATLAS_MODEL (and the corpus with NEURON_ATLAS_CORPUS);
both stay editable per run in the launchpad's resource config. Per-asset knobs (sampling, explain,
ablation, classify settings) are each asset's run config (`assets.config`).
"""

from __future__ import annotations

import os

from dagster import Definitions

from assets.ablations import build_ablation_assets
from assets.automation import (
    automation_sensor,
    corpus_source,
    model_checkpoint,
    observe_model_job,
    observe_model_schedule,
)
from assets.checks import build_asset_checks
from assets.classification import build_classification_assets
from assets.common import WAREHOUSE, layer_partitions
from assets.config import moved_knob_resources
from assets.interpret import build_interpret_assets
from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, ExplainerResource, SimulatorResource, SubjectModelResource
from assets.stages import build_stage_assets
from assets.viewer import build_viewer_assets
from pipeline.core.models import EMBEDDED, model_layer_count
from pipeline.infra.warehouse import SCHEMA, default_data_path, default_database


def build_definitions(model: str | None = None, corpus: str | None = None, database: str | None = None) -> Definitions:
    """Resources are left at their field defaults (which read the NEURON_ATLAS_* variables) unless a
    test passes a model, corpus or database explicitly."""
    n_layers = model_layer_count(model or os.environ.get("NEURON_ATLAS_MODEL") or EMBEDDED)
    return Definitions(
        assets=[model_checkpoint, corpus_source]
        + build_stage_assets(n_layers)
        + build_interpret_assets(layer_partitions(n_layers))
        + build_ablation_assets(layer_partitions(n_layers))
        + build_classification_assets(layer_partitions(n_layers))
        + build_viewer_assets(layer_partitions(n_layers)),
        asset_checks=build_asset_checks(),
        jobs=[observe_model_job],
        schedules=[observe_model_schedule],
        sensors=[automation_sensor],
        resources={
            "subject": SubjectModelResource(model=model) if model else SubjectModelResource(),
            "corpus": CorpusResource(source=corpus) if corpus else CorpusResource(),
            "explainer": ExplainerResource(),
            "simulator": SimulatorResource(),
            WAREHOUSE: WarehouseIOManager(
                database=database or default_database(), schema=SCHEMA, data_path=default_data_path()
            ),
        }
        | moved_knob_resources(),
    )


defs = build_definitions()

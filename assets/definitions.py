"""The code location: `dagster dev` and `dagster asset materialize` load `defs` from here.

The layer partitions come from the configured model's layer count, read from its config at load
time, so the model is chosen with NEURON_ATLAS_MODEL (and the corpus with NEURON_ATLAS_CORPUS);
both stay editable per run in the launchpad's resource config.
"""

from __future__ import annotations

import os

from dagster import Definitions

from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, SamplingResource, SubjectModelResource
from assets.stages import WAREHOUSE, build_stage_assets
from pipeline.models import EMBEDDED, model_layer_count
from pipeline.warehouse import SCHEMA, default_database


def build_definitions(model: str | None = None, corpus: str | None = None, database: str | None = None) -> Definitions:
    model = model or os.environ.get("NEURON_ATLAS_MODEL") or EMBEDDED
    corpus = corpus or os.environ.get("NEURON_ATLAS_CORPUS") or "embedded"
    return Definitions(
        assets=build_stage_assets(model_layer_count(model)),
        resources={
            "subject": SubjectModelResource(
                model=model,
                device=os.environ.get("NEURON_ATLAS_DEVICE", "cpu"),
                dtype=os.environ.get("NEURON_ATLAS_DTYPE", "float32"),
            ),
            "corpus": CorpusResource(source=corpus),
            "sampling": SamplingResource(),
            WAREHOUSE: WarehouseIOManager(database=database or default_database(), schema=SCHEMA),
        },
    )


defs = build_definitions()

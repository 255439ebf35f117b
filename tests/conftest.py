"""Shared fixtures: a tiny hand-set model on disk, and running the real Dagster assets on it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_digit_corpus, write_digit_model  # noqa: E402

from assets.ablations import build_ablation_assets  # noqa: E402
from assets.checks import build_asset_checks  # noqa: E402
from assets.classification import build_classification_assets  # noqa: E402
from assets.config import (  # noqa: E402
    AblationConfig,
    ClassifyConfig,
    ExplainConfig,
    SamplingConfig,
    TopTokensConfig,
    atlas_run_config,
    moved_knob_resources,
)
from assets.interpret import build_interpret_assets  # noqa: E402
from assets.io import WarehouseIOManager  # noqa: E402
from assets.resources import (  # noqa: E402
    CorpusResource,
    ExplainerResource,
    SimulatorResource,
    SubjectModelResource,
)
from assets.stages import build_stage_assets, layer_partitions  # noqa: E402
from assets.viewer import build_viewer_assets  # noqa: E402
from pipeline.infra.warehouse import SCHEMA  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def llm_cache_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the tests' LLM response cache out of the project's warehouse/."""
    path = tmp_path_factory.mktemp("llm_cache") / "llm_cache.sqlite"
    old = os.environ.get("NEURON_ATLAS_LLM_CACHE")
    os.environ["NEURON_ATLAS_LLM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("NEURON_ATLAS_LLM_CACHE", None)
    else:
        os.environ["NEURON_ATLAS_LLM_CACHE"] = old


@pytest.fixture(scope="session")
def digit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_model(tmp_path_factory.mktemp("digit_model"))


@pytest.fixture(scope="session")
def digit_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_corpus(tmp_path_factory.mktemp("corpus") / "digits.jsonl")


def run_stages(
    database: Path,
    n_layers: int,
    layers: tuple[int, int],
    subject: SubjectModelResource,
    corpus: CorpusResource,
    sampling: SamplingConfig,
    selection: str | list[str] | None = None,
    instance: DagsterInstance | None = None,
    explainer: ExplainerResource | None = None,
    simulator: SimulatorResource | None = None,
    explain: ExplainConfig | None = None,
    ablation: AblationConfig | None = None,
    raise_on_error: bool = True,
    classify: ClassifyConfig | None = None,
    top_tokens: TopTokensConfig | None = None,
) -> Any:
    """Materialize the stage assets (and, given an explainer and simulator, explanations/simulations/
    scores/ablations/viewer; given `classify` too, classification_scores) for a range of layer
    partitions in one run, for real. The knobs go in as the assets' run config, as a launched run
    gets them; the external things as resources."""
    assets = build_stage_assets(n_layers)
    resources: dict[str, Any] = {
        "subject": subject,
        "corpus": corpus,
        "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
    } | moved_knob_resources()
    ops: dict[str, Any] = {"activation_records": sampling, "unit_examples": top_tokens}
    if explainer is not None or simulator is not None:
        layers_def = layer_partitions(n_layers)
        assets += (
            build_interpret_assets(layers_def) + build_ablation_assets(layers_def) + build_viewer_assets(layers_def)
        )
        resources |= {"explainer": explainer or ExplainerResource(), "simulator": simulator or SimulatorResource()}
        ops |= {"explanations": explain, "ablations": ablation}
        if classify is not None:
            assets += build_classification_assets(layers_def)
            ops["classification_scores"] = classify
    keys = {key for a in assets for key in a.keys}
    selected = keys if selection is None else AssetSelection.from_coercible(selection).resolve(assets)
    checks = [c for c in build_asset_checks() if all(k.asset_key in keys for k in c.check_keys)]
    return materialize(
        [*assets, *checks],
        selection=selection,
        resources=resources,
        run_config=atlas_run_config(ops, selection={k.to_user_string() for k in selected}),
        tags={
            "dagster/asset_partition_range_start": str(layers[0]),
            "dagster/asset_partition_range_end": str(layers[1]),
        },
        instance=instance or DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


def local_llm() -> dict[str, Any]:
    """`run_stages` keyword arguments: the in-process explainer and simulator (the embedded Gemma)."""
    return {"explainer": ExplainerResource(), "simulator": SimulatorResource()}


def loopback_llm(
    server: Any, explainer: dict[str, Any] | None = None, simulator: dict[str, Any] | None = None, **shared: Any
) -> dict[str, Any]:
    """`run_stages` keyword arguments: explainer and simulator on the openai backend pointed at a
    `loopback_llm.LoopbackServer` (shared settings, then each role's own)."""
    common = {"backend": "openai", "model": "loop-model", "base_url": server.base_url} | shared
    return {
        "explainer": ExplainerResource(**common | (explainer or {})),
        "simulator": SimulatorResource(**common | (simulator or {})),
    }


def code_step(max_act: float, min_act: float) -> float:
    """The most a stored activation may differ from the captured one: half of the record's 8-bit
    code step, (max_act - min_act) / 255 / 2 (`pipeline.core.records.quantize`)."""
    return (float(max_act) - float(min_act)) / 510


def query(database: Path) -> Callable[..., list[tuple]]:
    def run(sql: str, params: list | None = None) -> list[tuple]:
        with duckdb.connect(str(database), read_only=True) as conn:
            return conn.execute(sql, params or []).fetchall()

    return run

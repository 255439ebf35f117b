"""The per-asset knobs are Dagster run config on the assets (`assets.config`): visible in each asset's
config schema, applied when given as launchpad-style `ops:` config (also through the real
`dagster asset materialize -c config.yaml --partition-range`), and a run that still sets them as the
old `resources:` config fails with a message saying where they went, instead of dropping them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import query, run_stages
from dagster import AssetKey, DagsterInstance, Definitions, RunConfig, materialize
from dagster_dev import for_selection, project_env, run_cli, run_config
from tiny_models import DIGIT_NEURON

from assets.config import (
    MOVED_KNOBS,
    AblationConfig,
    ClassifyConfig,
    ExplainConfig,
    SamplingConfig,
    TopTokensConfig,
    atlas_run_config,
    moved_to,
)
from assets.definitions import build_definitions
from assets.resources import CorpusResource, SubjectModelResource

# Field defaults as the resources had them (README's settings table): moving them changed none.
DEFAULTS: dict[str, dict[str, Any]] = {
    "activation_records": {"top_k": 20, "random_k": 20, "quantile_bins": 4, "per_quantile": 5, "batch_size": 16,
                           "seed": 0, "negative": "auto"},
    "unit_examples": {"n_top_tokens": 10, "min_token_count": 2},
    "explanations": {"n_neurons": 8, "neuron_ids": None, "samples": 2, "temperature": 0.8, "max_tokens": 40,
                     "seed": 0, "avoid_few_shot_copies": True},
    "ablations": {"top_n": 4, "random_n": 0, "seed": 0, "batch_size": 4},
    "classification_scores": {"scorers": ["detection", "fuzzing"], "examples_per_prompt": 5, "max_per_class": 10,
                              "activating_level": 1, "seed": 0, "window": 16},
}  # fmt: skip
CONFIGS = {
    "activation_records": SamplingConfig,
    "unit_examples": TopTokensConfig,
    "explanations": ExplainConfig,
    "ablations": AblationConfig,
    "classification_scores": ClassifyConfig,
}

LAUNCHPAD_YAML = """
ops:
  activation_records:
    config:
      top_k: 3
      random_k: 2
      quantile_bins: 2
      per_quantile: 1
  unit_examples:
    config:
      n_top_tokens: 2
      min_token_count: 1
"""


@pytest.fixture
def defs(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> Definitions:
    return build_definitions(
        model=str(digit_model_dir), corpus=str(digit_corpus), database=str(tmp_path / "neuron_atlas.duckdb")
    )


def _corpus(digit_corpus: Path) -> dict[str, Any]:
    # A resource's run config replaces its constructed values, so the source is given again.
    return {"corpus": {"config": {"source": str(digit_corpus), "seq_len": 16, "n_sequences": 40, "seed": 3}}}


def _run(defs: Definitions, config: dict[str, Any], selection: list[str], layers: str = "0") -> Any:
    """One run of the code location's asset job, as the launchpad launches it."""
    job = defs.resolve_implicit_global_asset_job_def()
    first, last = layers.split("...") if "..." in layers else (layers, layers)
    return job.execute_in_process(
        run_config=config,
        asset_selection=[AssetKey(name) for name in selection],
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _failures(result: Any) -> str:
    return "\n".join(
        str(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    )


def test_each_asset_has_its_knobs_as_config_with_the_old_defaults(defs: Definitions) -> None:
    graph = defs.resolve_asset_graph()
    for name, defaults in DEFAULTS.items():
        fields = graph.get(AssetKey(name)).assets_def.op.config_schema.config_type.fields
        assert set(fields) == set(defaults), name
        assert all(fields[f].description for f in fields), name
        assert CONFIGS[name]().model_dump() == defaults, name
    # Every field of the old resources has exactly one new home.
    for assets in MOVED_KNOBS.values():
        assert set(assets) <= set(CONFIGS)
    assert {f for a in ("activation_records", "unit_examples") for f in DEFAULTS[a]} == {
        "top_k", "random_k", "quantile_bins", "per_quantile", "batch_size", "n_top_tokens", "min_token_count",
        "seed", "negative",
    }  # fmt: skip
    # The external things stay resources; the moved keys are placeholders that no asset requires.
    assert {"subject", "corpus", "explainer", "simulator", "warehouse"} <= set(defs.resources)
    required = {
        k for node in graph.asset_nodes if node.is_materializable for k in node.assets_def.required_resource_keys
    }
    assert not required & set(MOVED_KNOBS)


def test_launchpad_yaml_ops_config_changes_what_is_written(
    defs: Definitions, tmp_path: Path, digit_corpus: Path
) -> None:
    """Launchpad-style YAML: `ops: {activation_records: {config: ...}}` sets the records kept, and the
    activation_records_complete check counts against the same numbers (it reads this run's config)."""
    config = yaml.safe_load(LAUNCHPAD_YAML) | {"resources": _corpus(digit_corpus)}
    assert _run(defs, for_selection(config, "subject_model,corpus_tokens"), ["subject_model", "corpus_tokens"]).success
    result = _run(defs, config, ["activation_records", "unit_examples"])
    assert result.success, _failures(result)
    checks = result.get_asset_check_evaluations()
    assert "activation_records_complete" in [c.check_name for c in checks] and all(c.passed for c in checks)
    q = query(tmp_path / "neuron_atlas.duckdb")
    per_kind = q(
        "select record_list, max(n) from (select neuron, record_list, count(*) n from atlas.records_long"
        " where layer = 0 and record_list in ('top', 'random') group by all) group by all order by all"
    )
    assert per_kind == [("random", 2), ("top", 3)]
    assert q("select max(len(top_tokens)) from atlas.unit_examples where layer = 0") == [(2,)]


def test_old_resource_config_fails_the_step_naming_the_new_place(
    defs: Definitions, tmp_path: Path, digit_corpus: Path
) -> None:
    old = {"sampling": {"config": {"top_k": 3, "n_top_tokens": 2}}}
    setup = _run(defs, {"resources": _corpus(digit_corpus)}, ["subject_model", "corpus_tokens"])
    assert setup.success
    result = _run(defs, {"resources": _corpus(digit_corpus) | old}, ["activation_records"])
    assert not result.success
    message = _failures(result)
    assert "resource config for sampling is no longer read" in message
    new = {"ops": {"activation_records": {"config": {"top_k": 3}}, "unit_examples": {"config": {"n_top_tokens": 2}}}}
    assert json.dumps(new) in message
    assert q_tables(tmp_path) == ["corpus_tokens", "subject_model"]  # nothing was written with the wrong settings


def q_tables(tmp_path: Path) -> list[str]:
    sql = "select table_name from information_schema.tables where table_type = 'BASE TABLE' order by 1"
    return [r[0] for r in query(tmp_path / "neuron_atlas.duckdb")(sql)]


@pytest.mark.parametrize("key", sorted(MOVED_KNOBS))
def test_every_moved_key_is_refused_by_its_assets(key: str) -> None:
    """The message maps each old field to its asset (sampling splits over two)."""
    config_type = next(iter(MOVED_KNOBS[key].values()))
    field = next(iter(config_type.model_fields))
    ops = moved_to(key, {field: 1})
    assert list(ops) == [next(iter(MOVED_KNOBS[key]))] and ops[next(iter(ops))] == {"config": {field: 1}}
    assert moved_to("sampling", {"min_token_count": 1}) == {"unit_examples": {"config": {"min_token_count": 1}}}


def test_the_guard_runs_in_run_stages_too(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    """run_stages passes the knobs as op config and keeps the placeholders, so an old-style extra
    resource config given to the same assets is refused there as well; an empty old entry is no setting."""
    from assets.config import moved_knob_resources
    from assets.io import WarehouseIOManager
    from assets.stages import build_stage_assets
    from pipeline.infra.warehouse import SCHEMA

    database = tmp_path / "neuron_atlas.duckdb"
    subject = SubjectModelResource(model=str(digit_model_dir))
    corpus = CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=40, seed=3)
    sampling = SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=1)
    assert run_stages(database, 2, (0, 0), subject, corpus, sampling).success
    resources = {
        "subject": subject,
        "corpus": corpus,
        "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
    }
    for entry, refused in (({"config": {}}, False), ({"config": {"window": 3}}, True)):
        result = materialize(
            build_stage_assets(2),
            selection=["unit_examples"],
            partition_key="0",
            resources=resources | moved_knob_resources(),
            run_config=RunConfig(ops={"unit_examples": TopTokensConfig()}, resources={"classify": entry}),
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
        assert result.success != refused
        if refused:
            assert '"classification_scores": {"config": {"window": 3}}' in _failures(result)


def test_atlas_run_config_drops_the_config_of_unselected_assets() -> None:
    """Dagster refuses op config for an op not in the run; the helpers cut it to the selection."""
    config = atlas_run_config({"activation_records": SamplingConfig(top_k=3), "explanations": None}, selection={"x"})
    assert config.ops == {}
    config = atlas_run_config({"activation_records": SamplingConfig(top_k=3)}, selection={"activation_records"})
    assert config.ops["activation_records"].top_k == 3
    small = run_config(ops={"explanations": {"neuron_ids": [1]}})
    assert set(for_selection(small, "activation_records,unit_examples")["ops"]) == {"activation_records"}
    assert set(for_selection(small, None)["ops"]) == {"activation_records", "explanations"}


@pytest.mark.slow
def test_cli_config_yaml_with_a_partition_range(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    """The real `dagster asset materialize -c config.yaml --partition-range 0...1`: one run over both
    layers with the asset config from the file (slow: two `dagster` processes, ~90 s on 2 cores)."""
    from dagster_dev import BIN

    env = project_env(tmp_path, digit_model_dir, digit_corpus)
    setup = tmp_path / "setup.yaml"
    setup.write_text(yaml.safe_dump(for_selection(run_config(), "subject_model,corpus_tokens")))
    records = tmp_path / "records.yaml"
    records.write_text(LAUNCHPAD_YAML + yaml.safe_dump({"resources": run_config()["resources"]}))
    dagster = [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions"]
    run_cli([*dagster, "-c", str(setup), "--select", "subject_model,corpus_tokens"], env)
    run_cli([*dagster, "-c", str(records), "--select", "activation_records,unit_examples",
             "--partition-range", "0...1"], env)  # fmt: skip
    q = query(Path(env["NEURON_ATLAS_DB"]))
    assert q(
        "select layer, count(distinct run_id), max(len(top)) from atlas.activation_records group by layer order by 1"
    ) == [(0, 1, 3), (1, 1, 3)]
    assert q("select count(*) from atlas.unit_examples where len(top_tokens) > 2") == [(0,)]
    assert q("select count(*) from atlas.unit_examples where neuron = ?", [DIGIT_NEURON])[0][0] > 0

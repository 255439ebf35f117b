"""The real Dagster tools on the real code location: `dagster dev` loads it without errors and its
GraphQL API shows the stages with one partition per layer; `dagster asset materialize` runs every
layer of the embedded model in one run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import query
from dagster_dev import PARTITIONED, ROOT, STAGES, dagster_dev, materialize_command, project_env, run_cli, run_config

from pipeline.core.models import EMBEDDED, model_layer_count

ASSETS = "{ assetNodes { assetKey { path } isPartitioned partitionKeys } }"


def test_dagster_dev_loads_the_definitions(tmp_path: Path) -> None:
    with dagster_dev(project_env(tmp_path, EMBEDDED), tmp_path / "dagster_dev.log") as dev:
        nodes = {"/".join(n["assetKey"]["path"]): n for n in dev.graphql(ASSETS)["assetNodes"]}
    assert set(STAGES) <= set(nodes)
    layers = [str(i) for i in range(model_layer_count(EMBEDDED))]
    for name in STAGES:
        assert nodes[name]["isPartitioned"] == (name in PARTITIONED)
    for name in PARTITIONED:
        assert nodes[name]["partitionKeys"] == layers


@pytest.mark.slow
def test_cli_materializes_every_layer_in_one_run(tmp_path: Path) -> None:
    env = project_env(tmp_path, EMBEDDED)
    config = run_config(
        ops={"activation_records": {"top_k": 8, "random_k": 8}},
        resources={"corpus": {"n_sequences": 16, "seq_len": 32}},
        base={},
    )
    last = model_layer_count(EMBEDDED) - 1
    for extra in (
        ["--select", "subject_model,corpus_tokens"],
        ["--select", "activation_records,unit_examples", "--partition-range", f"0...{last}"],
    ):
        run_cli(materialize_command(config, *extra), env, timeout=900)
    q = query(Path(env["NEURON_ATLAS_DB"]))
    d_mlp = q("select d_mlp from atlas.subject_model")[0][0]
    n = (last + 1) * d_mlp
    # One record row per neuron; Gemma's MLP is gated, so capture keeps both directions by default
    # and unit_examples holds one row per unit: (neuron, '+') and (neuron, '-').
    assert q("select count(distinct layer), count(*), count(distinct run_id) from atlas.activation_records") == [
        (last + 1, n, 1)
    ]
    assert q(
        "select polarity, count(distinct layer), count(*), count(distinct run_id) from atlas.unit_examples"
        " group by polarity order by polarity"
    ) == [("+", last + 1, n, 1), ("-", last + 1, n, 1)]


def test_launchpad_config_of_one_field_keeps_the_environments_choices(tmp_path: Path) -> None:
    """Dagster replaces a resource's constructed values with any run config given for it, so the
    NEURON_ATLAS_* choices live in the fields' defaults: editing one field of the explainer or the
    simulator keeps the backend, model, server and api chosen by environment. The role-specific
    variables win over the shared NEURON_ATLAS_LLM_* ones, which still set what they leave out."""
    script = """
from dagster import asset, materialize
from assets.definitions import defs
res = {k: defs.resources[k] for k in ("explainer", "simulator", "subject")}
@asset
def probe(explainer: type(res["explainer"]), simulator: type(res["simulator"]), subject: type(res["subject"])) -> None:
    for role in (explainer, simulator):
        print("CHOSEN", role.backend, role.model, role.base_url, role.api, role.max_concurrency, role.top_logprobs
              if hasattr(role, "top_logprobs") else "-")
    print("SUBJECT", subject.model)
materialize([probe], resources=res, run_config={"resources": {
    "explainer": {"config": {"max_concurrency": 1}},
    "simulator": {"config": {"top_logprobs": 5}},
    "subject": {"config": {"revision": "main"}}}})
"""
    env = project_env(tmp_path, EMBEDDED) | {
        "NEURON_ATLAS_LLM_BACKEND": "openai",
        "NEURON_ATLAS_LLM_MODEL": "served-model",
        "NEURON_ATLAS_LLM_BASE_URL": "http://127.0.0.1:9/v1",
        "NEURON_ATLAS_EXPLAINER_MODEL": "big-chat-model",
        "NEURON_ATLAS_EXPLAINER_API": "chat",
        "NEURON_ATLAS_SIMULATOR_BASE_URL": "http://127.0.0.1:10/v1",
    }
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CHOSEN openai big-chat-model http://127.0.0.1:9/v1 chat 1 -" in done.stdout
    assert "CHOSEN openai served-model http://127.0.0.1:10/v1 completions 4 5" in done.stdout
    assert f"SUBJECT {EMBEDDED}" in done.stdout

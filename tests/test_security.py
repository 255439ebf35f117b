"""Security: names with quotes cannot inject SQL, and an API key never leaves the environment.

The key test runs a real `dagster asset materialize` against a loopback server that (like a
careless server) quotes the Authorization header back in an error body, then greps everything
the run left behind: Dagster's event and compute logs, the warehouse, the response cache and the
command's own output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import query, run_stages
from dagster import DagsterInstance, materialize
from dagster_dev import ROOT, SMALL_RESOURCES, materialize_command, project_env
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON

from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, SamplingResource, SubjectModelResource
from assets.stages import build_stage_assets
from pipeline.warehouse import SCHEMA

HOSTILE = """it's "odd"'); drop table atlas.corpus_tokens; --"""
TABLES = ["activation_records", "corpus_tokens", "subject_model", "top_k_examples"]


def test_quotes_in_model_and_corpus_names_are_data_not_sql(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    model = tmp_path / HOSTILE / "model"
    shutil.copytree(digit_model_dir, model)
    corpus = tmp_path / HOSTILE / "corpus.jsonl"
    shutil.copy(digit_corpus, corpus)
    database = tmp_path / "neuron_atlas.duckdb"
    resources = {
        "subject": SubjectModelResource(model=str(model)),
        "corpus": CorpusResource(source=str(corpus), seq_len=16, n_sequences=24, seed=3),
        "sampling": SamplingResource(top_k=4, random_k=4, quantile_bins=2, per_quantile=2),
    }
    for _ in range(2):  # the rerun deletes and rewrites the partition: the delete path too
        assert run_stages(database, n_layers=2, layers=(0, 1), **resources).success
    q = query(database)
    tables = [r[0] for r in q("select table_name from information_schema.tables where table_type = 'BASE TABLE'")]
    assert sorted(tables) == TABLES
    model_ids = {r[0] for r in q("select distinct model_id from atlas.current_activation_records")}
    assert model_ids == {str(model.resolve())} and HOSTILE in next(iter(model_ids))
    assert q("select count(distinct layer) from atlas.current_top_k_examples") == [(2,)]


def test_a_partition_key_with_sql_in_it_is_refused(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    resources = {
        "subject": SubjectModelResource(model=str(digit_model_dir)),
        "corpus": CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=24, seed=3),
        "sampling": SamplingResource(top_k=4, random_k=4, quantile_bins=2, per_quantile=2),
        "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
    }
    stages = {k: v for k, v in resources.items() if k != "warehouse"}
    assert run_stages(database, n_layers=2, layers=(0, 0), **stages).success
    with pytest.raises(Exception, match="partition"):
        materialize(
            build_stage_assets(2),
            selection=["activation_records"],
            partition_key="0'); drop table atlas.corpus_tokens; --",
            resources=resources,
            instance=DagsterInstance.ephemeral(),
        )
    assert q_tables(database) == TABLES


def q_tables(database: Path) -> list[str]:
    sql = "select table_name from information_schema.tables where table_type = 'BASE TABLE'"
    return sorted(r[0] for r in query(database)(sql))


@pytest.mark.slow
def test_a_planted_api_key_appears_nowhere_a_run_writes(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    key = "sk-planted-NEVER-STORE-314159"
    state = ServerState(replies=[("the main thing this neuron does is find", " digits.\n")], slot_probs=[{"0": 1.0}])
    state.plan = {"the main thing this neuron does is find": ["401"]}  # one neuron's error body quotes the key
    with LoopbackServer(state) as server:
        env = project_env(
            tmp_path,
            digit_model_dir,
            digit_corpus,
            NEURON_ATLAS_LLM_BACKEND="openai",
            NEURON_ATLAS_LLM_MODEL="loop-model",
            NEURON_ATLAS_LLM_BASE_URL=server.base_url,
            OPENAI_API_KEY=key,
        )
        cli = materialize_command(
            SMALL_RESOURCES
            | {"explain": {"config": {"neuron_ids": [DIGIT_NEURON, 5, 6]}}}
            | {"explainer": {"config": {"max_concurrency": 1}}}
        )
        outputs = []
        for select in ("subject_model,corpus_tokens", "activation_records,top_k_examples,explanations,simulations"):
            extra = ["--select", select] + (["--partition", "0"] if "explanations" in select else [])
            done = subprocess.run(cli + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            outputs.append(done.stdout + done.stderr)
    assert any(key in h for h in state.auth_headers)  # it was sent
    failures = query(Path(env["NEURON_ATLAS_DB"]))(
        "select failure_reason from atlas.explanations where failure_reason is not null"
    )
    assert failures and "HTTP 401" in failures[0][0]  # the quoting error was recorded, redacted
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files) and any("compute_logs" in str(p) or p.suffix in {".out", ".err"}
                                                         for p in files)  # fmt: skip
    leaked = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaked == [] and not any(key in out for out in outputs)

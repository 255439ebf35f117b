"""Two machines write one DuckLake at once, through one Postgres-backed Dagster instance, while a
third reads it; then one writer is SIGKILLed mid-layer and the layer is finished from the shared
response cache on the other machine.

Everything is real: PostgreSQL started by the test on 127.0.0.1 (the lake's catalog, the LLM
cache, the instance's storage), `dagster asset materialize` processes with their own working
directories and DAGSTER_HOMEs (deploy/dagster.yaml), the hand-set digit model as subject and the
embedded Gemma as explainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from dagster_dev import ROOT, SMALL_CONFIG, run_config
from postgres_server import PostgresServer, postgres_server
from scale_out import new_machine, new_platform

from pipeline.core.interpret import KINDS as EXPLANATION_KINDS
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.warehouse import open_warehouse

pytestmark = pytest.mark.slow

# Neurons that fire on the test corpus in both layers of the digit model (a dead one makes no request).
FIRST = [5, 13]  # explained in each layer by the two concurrent writers
SECOND = [6, 8, 10, 12]  # of layer 1, whose writer is killed, then finished on the other machine
KINDS = sorted(EXPLANATION_KINDS)  # each neuron's explanations, in the order the queries sort them

# The third process: a notebook that keeps one read transaction open for the whole test (its
# snapshot must never change) and also opens a fresh connection every half second (each must see
# whole layers only). It prints one JSON line per look.
READER = """
import json, sys, time
from pathlib import Path
from pipeline.infra.warehouse import open_warehouse
database, stop = sys.argv[1], Path(sys.argv[2])
KEYS = {"activation_records": "neuron", "explanations": "(neuron, kind, sample_index)"}
def look(conn):
    tables = {r[0] for r in conn.execute("select table_name from information_schema.tables"
                                         " where table_schema = 'atlas' and table_type = 'BASE TABLE'").fetchall()}
    return [list(r) for t, key in KEYS.items() if t in tables for r in conn.execute(
        f"select '{t}', layer, count(*), count(distinct {key}) from atlas.{t} group by layer order by layer"
    ).fetchall()]
with open_warehouse(database, read_only=True) as held:
    held.begin()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        last = stop.exists()  # set once the writers have exited: this look sees all they wrote
        start = time.time()
        with open_warehouse(database, read_only=True) as conn:
            fresh = look(conn)
        print(json.dumps({"t": start, "took": time.time() - start, "fresh": fresh, "held": look(held)}), flush=True)
        if last:
            break
        time.sleep(0.5)
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def _config(neurons: list[int]) -> dict:
    # One sample: each neuron's explanations are one of each kind (llm, token_lookup, token_space).
    # Units' requests in batches of 2 (explainer.batch_requests), so the killed writer has finished some
    # neurons and not others.
    return run_config(
        ops={"explanations": {"neuron_ids": neurons, "samples": 1}}, resources={"explainer": {"batch_requests": 2}}
    )


def _sql(database: str, sql: str) -> list[tuple]:
    with open_warehouse(database, read_only=True) as conn:
        return conn.execute(sql).fetchall()


def _explanations(database: str, layer: int) -> list[tuple]:
    return _sql(
        database,
        f"select neuron, kind, sample_index, run_id, cached from atlas.explanations where layer = {layer} order by all",
    )


def test_two_machines_write_one_lake_while_a_third_reads_and_a_killed_writer_resumes_elsewhere(
    postgres: PostgresServer,
    tmp_path: Path,
    digit_model_dir: Path,
    digit_corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    platform = new_platform(postgres, tmp_path)
    for key, value in platform.env().items():  # this process reads the lake and the cache too
        monkeypatch.setenv(key, value)
    a, b = (new_machine(platform, tmp_path, name, digit_model_dir, digit_corpus) for name in ("machine_a", "machine_b"))
    database = platform.warehouse
    a.run(SMALL_CONFIG, "--select", "subject_model,corpus_tokens", log_name="setup")

    # Two writers (different layers, same tables) and a reader, at once.
    stop = tmp_path / "stop_reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, database, str(stop)],
        cwd=ROOT,
        env={**os.environ, **platform.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert reader.stdout is not None and json.loads(reader.stdout.readline()) == {"ready": True}
    stages = ("--select", "activation_records,unit_examples,explanations")
    began = time.time()
    writers = {
        layer: machine.start(_config(FIRST), *stages, "--partition", str(layer), log_name=f"write_layer_{layer}")
        for layer, machine in ((0, a), (1, b))
    }
    for layer, (proc, log) in writers.items():
        proc.wait(timeout=1200)
        assert proc.returncode == 0, f"layer {layer}:\n{log.read_text(errors='replace')[-4000:]}"
    ended = time.time()
    stop.touch()
    looks = [json.loads(line) for line in reader.communicate(timeout=120)[0].splitlines() if line.startswith("{")]
    assert reader.returncode == 0, looks[-3:]

    # The reader was never blocked: it kept reading during the writes, and its open transaction kept
    # one snapshot throughout while the writers committed around it.
    during = [look for look in looks if began < look["t"] < ended]
    assert len(during) >= 3, f"{len(during)} reads during the writes"
    assert all(look["held"] == looks[0]["held"] for look in looks)
    n_neurons = _sql(database, "select d_mlp from atlas.subject_model")[0][0]
    full = {"activation_records": n_neurons, "explanations": len(KINDS) * len(FIRST)}
    seen = {(table, layer) for look in looks for table, layer, _, _ in look["fresh"]}
    for look in looks:  # never a partial layer, never a duplicate
        for table, layer, rows, distinct in look["fresh"]:
            assert rows == distinct == full[table], (table, layer, rows, distinct)
    assert ("explanations", 0) in seen and ("explanations", 1) in seen  # it saw the writes land

    # Every row exactly once, each layer from its own machine's run.
    for table in ("activation_records", "unit_examples"):
        rows = _sql(
            database, f"select layer, count(*), count(distinct neuron) from atlas.{table} group by all order by 1"
        )
        assert rows == [(0, n_neurons, n_neurons), (1, n_neurons, n_neurons)], table
    run_ids = {}
    for layer in (0, 1):
        rows = _explanations(database, layer)
        assert [(n, k, s) for n, k, s, _, _ in rows] == [(n, k, 0) for n in FIRST for k in KINDS]
        (run_ids[layer],) = {r[3] for r in rows}
        assert _sql(database, f"select distinct run_id from atlas.activation_records where layer = {layer}") == [
            (run_ids[layer],)
        ]
    assert run_ids[0] != run_ids[1]

    # Each run's lineage is in the shared instance, seen from a third DAGSTER_HOME.
    home = tmp_path / "observer_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "deploy" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        for layer, run_id in run_ids.items():
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.SUCCESS
            for asset in ("activation_records", "unit_examples", "explanations"):
                records = instance.fetch_materializations(AssetKey(asset), limit=50).records
                assert (str(layer), run_id) in {(r.partition_key, r.run_id) for r in records}, (asset, layer)

    # Machine B explains more neurons of layer 1 while machine A rewrites layer 0; B is SIGKILLed
    # once two neurons are answered: nothing of its layer is half-written.
    cache = LLMCache(platform.cache)
    before = cache.count("complete")
    rewrite, rewrite_log = a.start(SMALL_CONFIG, "--select", "activation_records,unit_examples",
                                   "--partition", "0", log_name="rewrite_layer_0")  # fmt: skip
    killed, killed_log = b.start(_config(SECOND), "--select", "explanations", "--partition", "1", log_name="killed")
    try:
        deadline = time.monotonic() + 900
        while cache.count("complete") - before < 2:
            assert killed.poll() is None, f"ended before the kill:\n{killed_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no explanation finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finished = cache.count("complete") - before
    assert 2 <= finished < len(SECOND)
    assert [r[:4] for r in _explanations(database, 1)] == [
        (n, k, 0, run_ids[1]) for n in FIRST for k in KINDS
    ]  # the first run's rows, untouched
    rewrite.wait(timeout=900)
    assert rewrite.returncode == 0, rewrite_log.read_text(errors="replace")[-4000:]

    # Machine A finishes layer 1: what B finished comes from the shared cache, not the explainer.
    a.run(_config(SECOND), "--select", "explanations", "--partition", "1", log_name="resume_layer_1")
    rows = _explanations(database, 1)
    assert [(n, k, s) for n, k, s, _, _ in rows] == [(n, k, 0) for n in SECOND for k in KINDS]
    assert len({r[3] for r in rows}) == 1 and rows[0][3] not in run_ids.values()
    assert sum(1 for _, kind, _, _, cached in rows if kind == "llm" and cached) >= finished
    assert [r[:4] for r in _explanations(database, 0)] == [(n, k, 0, run_ids[0]) for n in FIRST for k in KINDS]

"""A real two-layer `dagster asset materialize` of explanations, SIGKILLed while it works on the
second layer: the first layer's rows are already committed and queryable, and Dagster records that
partition as materialized; nothing of the unfinished layer is written. Rerun, both layers end with
every row exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import query
from dagster import AssetKey, DagsterInstance
from dagster_dev import ROOT, materialize_command, project_env, run_cli, run_config

from pipeline.infra.warehouse import open_warehouse

NEURONS = list(range(4))
KINDS = ("llm", "token_lookup", "token_space")

pytestmark = pytest.mark.slow


def landed(database: Path) -> bool:
    """Whether layer 0's explanations are committed (read under the warehouse lock, between writes)."""
    with open_warehouse(str(database), read_only=True) as conn:
        tables = conn.execute("select table_name from information_schema.tables where table_schema = 'atlas'")
        if "explanations" not in {r[0] for r in tables.fetchall()}:
            return False
        return conn.execute("select count(*) from atlas.explanations where layer = 0").fetchone()[0] > 0


def test_killed_two_layer_run_keeps_its_first_layer(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    env = project_env(tmp_path, digit_model_dir, digit_corpus)
    database = Path(env["NEURON_ATLAS_DB"])
    config = run_config(ops={"explanations": {"neuron_ids": NEURONS}})
    for extra in (
        ["--select", "subject_model,corpus_tokens"],
        ["--select", "activation_records,unit_examples", "--partition-range", "0...1"],
    ):
        run_cli(materialize_command(config, *extra), env)

    explain = materialize_command(config, "--select", "explanations", "--partition-range", "0...1")
    proc = subprocess.Popen(explain, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not landed(database):
            assert proc.poll() is None, "the run ended before its first layer was committed"
            assert time.monotonic() < deadline, "the first layer was not committed in time"
            time.sleep(0.2)
        # The second layer's units take seconds each with the embedded explainer: still at work.
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    q = query(database)
    rows = q("select layer, neuron, polarity, kind from atlas.explanations order by all")
    layer0 = {(n, p) for la, n, p, _ in rows if la == 0}
    assert {la for la, *_ in rows} == {0}, "only the finished layer is written"
    assert {n for n, _ in layer0} == set(NEURONS)
    assert {k for *_, k in rows} == set(KINDS)

    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        assert instance.get_materialized_partitions(AssetKey("explanations")) == {"0"}
    finally:
        instance.dispose()

    run_cli(explain, env, timeout=900)
    again = q("select layer, neuron, polarity, kind, sample_index from atlas.explanations order by all")
    assert len(again) == len(set(again)), "every row once"
    assert [r[:4] for r in again if r[0] == 0] == sorted(rows)
    assert {r[0] for r in again} == {0, 1}
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        assert instance.get_materialized_partitions(AssetKey("explanations")) == {"0", "1"}
    finally:
        instance.dispose()

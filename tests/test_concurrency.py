"""Real `dagster asset materialize` runs at the same time on one warehouse file, each with the
multiprocess executor (its asset checks run in their own processes beside the next step): two
layers at once plus a second run of the same layer. None fails on DuckDB's file lock and the
tables end with every row exactly once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import query
from dagster_dev import ROOT, SMALL_CONFIG, materialize_command, project_env, run_cli

pytestmark = pytest.mark.slow


def test_concurrent_runs_and_partitions_share_the_warehouse(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    env = project_env(tmp_path, digit_model_dir, digit_corpus)
    database = Path(env["NEURON_ATLAS_DB"])
    setup = materialize_command(SMALL_CONFIG, "--select", "subject_model,corpus_tokens")
    run_cli(setup, env)

    stages = ["--select", "activation_records,unit_examples"]
    runs = [
        subprocess.Popen(
            materialize_command(SMALL_CONFIG, *stages, "--partition", layer),
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for layer in ("0", "1", "0")
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in runs]
    for proc, out in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
        assert "multiprocess" in out.lower()  # the executor each run used

    q = query(database)
    n_neurons = q("select count(distinct neuron) from atlas.activation_records where layer = 0")[0][0]
    assert n_neurons > 0
    for table in ("activation_records", "unit_examples"):
        rows = q(f"select layer, count(*), count(distinct neuron) from atlas.{table} group by layer order by layer")
        assert rows == [(0, n_neurons, n_neurons), (1, n_neurons, n_neurons)], table
        run_ids = q(f"select layer, count(distinct run_id) from atlas.{table} group by layer order by layer")
        assert run_ids == [(0, 1), (1, 1)], table  # the last writer of a layer replaced the other's rows

"""A real `dagster asset materialize` of explanations, SIGKILLed mid-layer and rerun: the neurons
finished before the kill come from the response cache, and the table ends with every row exactly
once (the killed run wrote nothing: a partition is written in one transaction at the end)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import query
from dagster_dev import ROOT, materialize_command, project_env, run_cli, run_config

NEURONS = list(range(8))

pytestmark = pytest.mark.slow


def cached_completions(cache: Path) -> int:
    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(cache, timeout=5) as conn:
            return int(conn.execute("select count(*) from responses where kind = 'complete'").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def test_killed_explanation_run_resumes_without_redoing_finished_neurons(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    env = project_env(tmp_path, digit_model_dir, digit_corpus)
    database, cache = Path(env["NEURON_ATLAS_DB"]), Path(env["NEURON_ATLAS_LLM_CACHE"])
    # Units' requests are generated in batches (explainer.batch_requests): batches of 2, so the run
    # has finished some neurons and not others when it is killed.
    config = run_config(ops={"explanations": {"neuron_ids": NEURONS}}, resources={"explainer": {"batch_requests": 2}})
    for extra in (
        ["--select", "subject_model,corpus_tokens"],
        ["--select", "activation_records,unit_examples", "--partition", "0"],
    ):
        run_cli(materialize_command(config, *extra), env)

    explain = materialize_command(config, "--select", "explanations", "--partition", "0")
    proc = subprocess.Popen(explain, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while cached_completions(cache) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no explanation finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finished = cached_completions(cache)
    assert 2 <= finished < len(NEURONS)
    q = query(database)
    tables = {r[0] for r in q("select table_name from information_schema.tables where table_schema = 'atlas'")}
    assert "explanations" not in tables  # nothing half-written

    run_cli(explain, env, timeout=900)
    rows = q("select neuron, kind, cached from atlas.explanations order by neuron, kind")
    samples = 2  # ExplainConfig's default
    assert [(n, k) for n, k, _ in rows] == [
        (n, k)
        for n in NEURONS
        for k in ("llm", "token_lookup", "token_space")
        for _ in range(samples if k == "llm" else 1)
    ]
    reused = sum(1 for _, k, c in rows if k == "llm" and c)
    assert reused >= finished  # finished before the kill: answered from the cache, not regenerated

"""What a user sees: `dagster dev` on the tiny digit model, runs launched through the webserver's GraphQL
API (as the launchpad does), the warehouse rows they write, and the Dagster UI in headless Chromium
showing the stage graph and the layer partitions, with screenshots kept as artifacts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from browser import artifacts_dir, chromium
from conftest import query
from dagster_dev import SMALL_CONFIG, STAGES, DagsterDev, dagster_dev, for_selection, project_env
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

LAYER = "1"
RUN_TIMEOUT_S = 600
PAGE_TIMEOUT_S = 90
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on InvalidSubsetError { message }
  ... on PipelineNotFoundError { message } } }"""
RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
ERROR = "error { message errorChain { error { message } } }"
RUN_ERRORS = f"""query($id: ID!) {{ logsForRun(runId: $id) {{ ... on EventConnection {{ events {{ __typename
  ... on ExecutionStepFailureEvent {{ stepKey {ERROR} }}
  ... on RunFailureEvent {{ message {ERROR} }}
  ... on EngineEvent {{ message {ERROR} }} }} }} }} }}"""
RUNS = "{ runsOrError { ... on Runs { results { runId status } } } }"
SCHEDULES = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name
  schedules { name scheduleState { id status } } } } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename
  ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }"""


def _quiet_instance(dev: DagsterDev) -> None:
    """Stop the hourly observation schedule (a test crossing the hour would otherwise observe the model
    and set off automation reruns mid-test) and mark Dagster's first-visit newsletter dialog as seen (on
    a fresh instance served on localhost it covers the page in every screenshot). The automation sensor
    stays on, as a user has it."""
    for repo in dev.graphql(SCHEDULES)["repositoriesOrError"]["nodes"]:
        for schedule in repo["schedules"]:
            if schedule["scheduleState"]["status"] == "RUNNING":
                stopped = dev.graphql(STOP_SCHEDULE, {"id": schedule["scheduleState"]["id"]})["stopRunningSchedule"]
                assert stopped.get("scheduleState", {}).get("status") == "STOPPED", stopped
    dev.graphql("mutation { setNuxSeen }")
    assert dev.graphql("{ shouldShowNux }")["shouldShowNux"] is False


def _launch(dev: DagsterDev, assets: Sequence[str], partition: str | None = None) -> str:
    """Launch a run of the implicit asset job for `assets` (one partition if given) as the UI does."""
    params = {
        "selector": {
            "repositoryLocationName": dev.location,
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [name]} for name in assets],
        },
        "runConfigData": for_selection(SMALL_CONFIG, ",".join(assets)),
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}] if partition else []},
    }
    launched = dev.graphql(LAUNCH, {"p": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def _error_text(event: dict) -> str:
    """An event's error with its causes (the first message alone is often Dagster's generic wrapper)."""
    error = event["error"]
    return " <- ".join([error["message"].strip()] + [c["error"]["message"].strip() for c in error["errorChain"]])


def _wait_for_success(dev: DagsterDev, run_id: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """A failed run fails the test with its event log's errors, not just its status."""
    start = time.monotonic()
    status = None
    while time.monotonic() - start < timeout:
        status = dev.graphql(RUN_STATUS, {"id": run_id})["runOrError"].get("status")
        if status in FINISHED:
            break
        time.sleep(1)
    if status != "SUCCESS":
        events = dev.graphql(RUN_ERRORS, {"id": run_id})["logsForRun"].get("events", [])
        errors = [f"{e['__typename']} {e.get('stepKey') or ''}: {_error_text(e)}" for e in events if e.get("error")]
        pytest.fail(
            f"run {run_id} is {status} after {time.monotonic() - start:.0f}s:\n" + "\n".join(errors), pytrace=False
        )


def _runs(dev: DagsterDev) -> dict[str, str]:
    return {r["runId"]: r["status"] for r in dev.graphql(RUNS)["runsOrError"]["results"]}


def _shows(text: str, needle: str) -> bool:
    """Whether the page shows the needle, whole or as the asset graph draws a long name: its middle cut
    to an ellipsis ("classification_scores" is drawn as "classifica…_scores")."""
    if needle in text:
        return True
    for line in text.splitlines():
        head, cut, tail = line.strip().partition("\u2026")
        if cut and len(head) + len(tail) >= 8 and len(head) + len(tail) < len(needle):
            if needle.startswith(head) and needle.endswith(tail):
                return True
    return False


def _wait_for_text(driver: WebDriver, dev: DagsterDev, needles: Sequence[str], what: str) -> str:
    """The page's text once every needle shows (the UI renders after its GraphQL queries answer)."""

    def shown(d: WebDriver) -> str | bool:
        try:
            text = d.find_element(By.TAG_NAME, "body").text
        except WebDriverException:  # a re-render replaced the body mid-read
            return False
        return text if all(_shows(text, n) for n in needles) else False

    try:
        return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=1).until(shown)
    except TimeoutException:
        pass  # reported below, outside the handler, so the failure shows no chained traceback
    try:
        text = driver.find_element(By.TAG_NAME, "body").text
    except WebDriverException as e:
        text = f"<unreadable: {e}>"
    missing = [n for n in needles if not _shows(text, n)]
    pytest.fail(
        f"{what}: {missing} not shown after {PAGE_TIMEOUT_S}s at {driver.current_url}\n"
        f"--- page text ---\n{text[-3000:]}\n--- dagster dev log ---\n{dev.log_tail()}",
        pytrace=False,
    )


def _screenshot(driver: WebDriver, name: str) -> Path:
    path = artifacts_dir() / name
    path.unlink(missing_ok=True)
    assert driver.save_screenshot(str(path)), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{path}: {len(data)} bytes"
    return path


def test_dagster_ui_shows_stages_and_materialized_layer(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    """One layer materialized through the webserver lands in the warehouse, and the UI a user opens
    shows every stage and exactly that layer partition as materialized."""
    config = json.loads((digit_model_dir / "config.json").read_text())
    n_layers, d_mlp = config["n_layer"], config["n_inner"]
    with dagster_dev(project_env(tmp_path, digit_model_dir, digit_corpus), tmp_path / "dagster_dev.log") as dev:
        _quiet_instance(dev)
        tokens_run = _launch(dev, ["subject_model", "corpus_tokens"])
        _wait_for_success(dev, tokens_run)
        records_run = _launch(dev, ["activation_records", "unit_examples"], partition=LAYER)
        _wait_for_success(dev, records_run)
        ours = {tokens_run: "SUCCESS", records_run: "SUCCESS"}
        # No other writer while the warehouse is read (automation never fills the missing layer 0).
        assert _runs(dev) == ours

        q = query(tmp_path / "neuron_atlas.duckdb")
        assert q("select n_layers, d_mlp from atlas.subject_model") == [(n_layers, d_mlp)]
        for table in ("activation_records", "unit_examples"):
            sql = f"select layer, count(*), count(distinct neuron), min(run_id), max(run_id) from atlas.{table}"
            rows = q(sql + " group by layer")
            assert rows == [(int(LAYER), d_mlp, d_mlp, records_run, records_run)], (table, rows)

        with chromium() as driver:
            driver.get(f"{dev.url}/locations/__repository__@{dev.location}/asset-groups/atlas/lineage")
            _wait_for_text(driver, dev, STAGES, "asset graph of group atlas")
            _screenshot(driver, "dagster_asset_graph.png")

            driver.get(f"{dev.url}/assets/activation_records?view=partitions")
            _wait_for_text(
                driver,
                dev,
                [f"{n_layers} Partitions Selected", "Materialized (1)", f"Missing ({n_layers - 1})"],
                "activation_records partitions",
            )
            driver.get(f"{dev.url}/assets/activation_records?view=partitions&partition={LAYER}")
            _wait_for_text(
                driver,
                dev,
                [f"{LAYER}\nMaterialized", "Latest materialization", records_run[:8], f"row_count\n{d_mlp}"],
                f"activation_records partition {LAYER}",
            )
            _screenshot(driver, "dagster_partitions.png")
        assert _runs(dev) == ours, "a run was launched while the UI was checked"

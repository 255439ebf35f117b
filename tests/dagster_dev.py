"""The real `dagster dev` for tests: started on a free loopback port, driven through its GraphQL API,
and always torn down as a whole process group (webserver, daemon, code servers and run workers), so a
failed test leaves no server behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The code location's assets: the unpartitioned stages and those with one partition per layer.
PARTITIONED = ("activation_records", "unit_examples", "explanations", "simulations", "scores", "ablations",
               "classification_scores", "neuron_viewer")  # fmt: skip
STAGES = ("subject_model", "corpus_tokens", *PARTITIONED)
# Run config small enough that a run on the digit model takes seconds on 2 CPU cores: the corpus is
# a resource, the sampling knobs are the activation_records asset's own config.
SMALL_CONFIG: dict[str, Any] = {
    "resources": {"corpus": {"config": {"seq_len": 16, "n_sequences": 40, "seed": 3}}},
    "ops": {"activation_records": {"config": {"top_k": 8, "random_k": 8, "quantile_bins": 2, "per_quantile": 2}}},
}


def run_config(
    ops: Mapping[str, Mapping[str, Any]] | None = None,
    resources: Mapping[str, Mapping[str, Any]] | None = None,
    base: Mapping[str, Any] = SMALL_CONFIG,
) -> dict[str, Any]:
    """`base` with more settings: `ops` maps an asset to its config fields, `resources` a resource
    key to its config fields (each merged into what `base` gives it)."""
    merged: dict[str, Any] = {k: dict(v) for k, v in base.items()}
    for section, extra in (("ops", ops), ("resources", resources)):
        entries = {k: {"config": dict(v["config"])} for k, v in base.get(section, {}).items()}
        for name, fields in (extra or {}).items():
            entries[name] = {"config": entries.get(name, {"config": {}})["config"] | dict(fields)}
        merged[section] = entries
    return merged


def for_selection(config: Mapping[str, Any], select: str | None) -> dict[str, Any]:
    """`config` less the config of assets not in `select` (comma-separated names; None: all):
    Dagster refuses config for an op that is not in the run."""
    config = dict(config)
    if select is not None and "ops" in config:
        names = set(select.split(","))
        config["ops"] = {k: v for k, v in config["ops"].items() if k in names}
    return config


def materialize_command(config: Mapping[str, Any], *args: str) -> list[str]:
    """`dagster asset materialize` on the project's code location with this run config (`run_config`)
    and these options (`--select`, partition options), the config cut down to the selected assets."""
    select = args[args.index("--select") + 1] if "--select" in args else None
    config_json = json.dumps(for_selection(config, select))
    return [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions", "--config-json", config_json,
            *args]  # fmt: skip


def project_env(tmp_path: Path, model: Path | str, corpus: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a real `dagster` subprocess: its own instance (telemetry off, the machine
    is offline), warehouse (tmp_path/neuron_atlas.duckdb) and LLM cache (tmp_path/llm_cache.sqlite)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "NEURON_ATLAS_MODEL": str(model),
        "NEURON_ATLAS_DB": str(tmp_path / "neuron_atlas.duckdb"),
        "NEURON_ATLAS_LLM_CACHE": str(tmp_path / "llm_cache.sqlite"),
    }
    if corpus is not None:
        env["NEURON_ATLAS_CORPUS"] = str(corpus)
    return env | extra


def run_cli(command: Sequence[str], env: Mapping[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a `dagster` command in the project root; the test fails with its output's tail unless it succeeds."""
    done = subprocess.run(list(command), cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30) -> dict:
    """The `data` of a GraphQL answer; GraphQL-level errors (a bad query) fail loudly instead of as None."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": dict(variables or {})}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    if answer.get("errors"):
        raise AssertionError(f"GraphQL errors: {[e.get('message') for e in answer['errors']]}")
    return answer["data"]


@dataclass
class DagsterDev:
    proc: subprocess.Popen
    port: int
    log_path: Path
    location: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict:
        return graphql(self.port, query, variables)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _default_sigint() -> None:
    """dagster dev maps SIGTERM to its SIGINT handler; a parent started in the background of a
    non-interactive shell passes SIGINT on as ignored, and then SIGTERM would be ignored too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_loaded(dev: DagsterDev, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    entries: list[dict] = []
    while time.monotonic() < deadline:
        if dev.proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {dev.proc.returncode}:\n{dev.log_tail()}")
        try:
            entries = graphql(dev.port, LOCATIONS, timeout=10)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return entries
        except OSError:
            pass  # the webserver is not listening yet
        time.sleep(1)
    raise AssertionError(f"code location not loaded after {timeout:.0f}s: {entries}\n{dev.log_tail()}")


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left (a run worker, a code server)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@contextmanager
def dagster_dev(
    env: Mapping[str, str],
    log_path: Path,
    target: Sequence[str] = ("-w", "workspace.yaml"),
    load_timeout: float = 180,
) -> Iterator[DagsterDev]:
    """`dagster dev` with its code location loaded (a load error fails with its message)."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "dagster"), "dev", *target, "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        dev = DagsterDev(proc, port, log_path)
        try:
            entries = _wait_loaded(dev, load_timeout)
            load = entries[0]["locationOrLoadError"]
            assert load["__typename"] == "RepositoryLocation", f"{entries}\n{dev.log_tail()}"
            dev.location = entries[0]["name"]
            yield dev
        finally:
            stop(proc)

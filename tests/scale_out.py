"""Several "machines" sharing one platform, for the multi-writer test and `bench.scale_out`.

The platform is what a real deployment shares: one PostgreSQL server holding the DuckLake catalog
(and, by default, the LLM response cache) and the Dagster instance's storage, plus a data
directory for the lake's files. Each machine has its own working directory and DAGSTER_HOME (with
the project's deploy/dagster.yaml copied in, as the README says to do) and runs the real
`dagster asset materialize` from there, so nothing but the platform is shared.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster_dev import ROOT
from dagster_dev import materialize_command as dagster_materialize_command
from postgres_server import PostgresServer

DEPLOY_YAML = ROOT / "deploy" / "dagster.yaml"


def materialize_command(config: Mapping[str, Any], *args: str) -> list[str]:
    """`dagster_dev.materialize_command` with this run config (`dagster_dev.run_config`) and options,
    each run in one process (the in-process executor): a step per process would add an interpreter
    start per step to every run, and the machines here are the unit of parallelism."""
    return dagster_materialize_command({**config, "execution": {"config": {"in_process": {}}}}, *args)


@dataclass
class Platform:
    postgres: PostgresServer
    lake_db: str
    dagster_db: str
    data_path: Path

    @property
    def warehouse(self) -> str:
        return f"ducklake:postgres:{self.postgres.libpq(self.lake_db)}"

    @property
    def cache(self) -> str:
        """Where the machines' LLM cache is by default (the lake's catalog database)."""
        return f"postgres:{self.postgres.libpq(self.lake_db)}"

    def env(self) -> dict[str, str]:
        """What every machine is configured with (deploy/dagster.yaml reads the NEURON_ATLAS_PG_*)."""
        return {
            "NEURON_ATLAS_DB": self.warehouse,
            "NEURON_ATLAS_DATA_PATH": str(self.data_path),
            "NEURON_ATLAS_PG_HOST": self.postgres.host,
            "NEURON_ATLAS_PG_PORT": str(self.postgres.port),
            "NEURON_ATLAS_PG_USER": self.postgres.user,
            "NEURON_ATLAS_DAGSTER_DB": self.dagster_db,
            **self.postgres.client_env(),
        }


def new_platform(postgres: PostgresServer, root: Path) -> Platform:
    """Fresh databases for the lake and the instance, and a fresh data directory."""
    tag = secrets.token_hex(4)
    platform = Platform(postgres, f"lake_{tag}", f"dagster_{tag}", root / f"shared_{tag}" / "lake_data")
    postgres.create_database(platform.lake_db)
    postgres.create_database(platform.dagster_db)
    return platform


@dataclass
class Machine:
    name: str
    cwd: Path
    env: dict[str, str]

    def start(self, config: Mapping[str, Any], *args: str, log_name: str) -> tuple[subprocess.Popen, Path]:
        """`dagster asset materialize` in the background (its own process group, for SIGKILL)."""
        log = self.cwd / f"{log_name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                materialize_command(config, *args),
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    def run(self, config: Mapping[str, Any], *args: str, log_name: str, timeout: float = 900) -> str:
        """`dagster asset materialize` to the end; fails with the log's tail unless it succeeded."""
        proc, log = self.start(config, *args, log_name=log_name)
        proc.wait(timeout=timeout)
        output = log.read_text(errors="replace")
        assert proc.returncode == 0, f"{self.name} {args} failed:\n{output[-4000:]}"
        return output


def new_machine(platform: Platform, root: Path, name: str, model: Path | str, corpus: Path | None) -> Machine:
    cwd = root / name
    home = cwd / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    env = {**os.environ, **platform.env(), "DAGSTER_HOME": str(home), "NEURON_ATLAS_MODEL": str(model)}
    env.pop("NEURON_ATLAS_LLM_CACHE", None)  # the default: the lake's Postgres, shared by all machines
    if corpus is not None:
        env["NEURON_ATLAS_CORPUS"] = str(corpus)
    return Machine(name, cwd, env)

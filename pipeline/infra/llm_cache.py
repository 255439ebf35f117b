"""A persistent cache of LLM responses, so a rerun (or a resumed layer) pays for no request twice.

Two stores, chosen by the location (NEURON_ATLAS_LLM_CACHE or `llm.cache_path`):
- a SQLite file (the default on one machine): several Dagster worker processes may share it (WAL
  mode plus a busy timeout make that safe);
- PostgreSQL (`postgres:<libpq connection string>` or a `postgresql://` URL; the default when the
  warehouse is a DuckLake, whose catalog database it then shares), for runs on many machines.
Each call commits at once, so every answer is stored the moment it arrives; each thread keeps its
own SQLite connection (opening one per call costs ~7 ms, more than a fast server's answer). Values
are JSON, never pickle: the store is data, not code. The key is a sha256 of what determines the
answer (backend, model, kind of request, prompt, parameters); credentials are no part of it and
are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.llm import Completion, GenerationParams, LLMBackend, LLMFailure, Prompt, Usage
from pipeline.core.simulator import Job, JobResult, OnJob, Simulator

DEFAULT_PATH = Path("warehouse") / "llm_cache.sqlite"
ENV_VAR = "NEURON_ATLAS_LLM_CACHE"
POSTGRES_PREFIX = "postgres:"
PG_TABLE = "neuron_atlas_llm_responses"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS responses"
    " (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
)
_PG_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {PG_TABLE}"
    " (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)"
)


def cache_key(backend: str, model: str, kind: str, prompt: str, params: dict[str, Any]) -> str:
    """sha256 over a canonical JSON of the request; the same request always gives the same key."""
    material = json.dumps(
        {"backend": backend, "model": model, "kind": kind, "prompt": prompt, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def default_cache_path() -> Path | str:
    """$NEURON_ATLAS_LLM_CACHE; else, with a DuckLake warehouse, its Postgres catalog database
    (shared by every machine that writes the lake); else llm_cache.sqlite beside the warehouse file."""
    from pipeline.infra.warehouse import default_database, is_lake, lake_catalog, sidecar_dir

    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    database = default_database()
    if is_lake(database):
        return POSTGRES_PREFIX + lake_catalog(database)
    return sidecar_dir(database) / DEFAULT_PATH.name


def postgres_conninfo(location: str) -> str | None:
    """The libpq connection string of a Postgres cache location, or None for a SQLite path."""
    if location.startswith(("postgresql://", "postgres://")):
        conninfo = location
    elif location.startswith(POSTGRES_PREFIX):
        conninfo = location[len(POSTGRES_PREFIX) :].strip()
    else:
        return None
    from pipeline.infra.warehouse import refuse_password  # loads DuckDB: only for a Postgres cache

    refuse_password(conninfo, "the LLM cache's location")
    return conninfo


class LLMCache:
    """get/put of JSON values by request; safe across threads, processes and (on Postgres) machines."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = 30.0):
        location = path if path is not None else default_cache_path()
        self.timeout_s = timeout_s
        self._conninfo = postgres_conninfo(str(location))
        if self._conninfo is not None:
            self.path: Path | str = str(location)
            self._pg_setup()
            return
        self.path = Path(location)
        self._lock = threading.Lock()  # serialises this process's writers; SQLite's lock does the rest
        self._local = threading.local()  # this thread's connection, and the process that opened it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"LLMCache({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        # WAL + NORMAL: a commit survives the process being killed (what a resumed run needs), not
        # an OS crash, which at worst loses the last answers: a cache, so they are asked again.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn, local.pid = self._connect(), os.getpid()
        return local.conn

    def _pg_connect(self) -> Any:
        import psycopg2  # installed with dagster-postgres

        return psycopg2.connect(self._conninfo, connect_timeout=max(1, int(self.timeout_s)))

    def _pg_setup(self) -> None:
        # Concurrent CREATE TABLE IF NOT EXISTS can still collide in Postgres: take turns on a lock.
        with closing(self._pg_connect()) as conn, conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PG_TABLE,))
            cur.execute(_PG_SCHEMA)

    def get(self, backend: str, model: str, kind: str, prompt: str, params: dict[str, Any]) -> Any | None:
        """The stored value, or None when this exact request has not been answered before."""
        key = cache_key(backend, model, kind, prompt, params)
        if self._conninfo is not None:
            with closing(self._pg_connect()) as conn, conn, conn.cursor() as cur:
                cur.execute(f"SELECT value FROM {PG_TABLE} WHERE key = %s", (key,))
                row = cur.fetchone()
        else:
            row = self._conn().execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, backend: str, model: str, kind: str, prompt: str, params: dict[str, Any], value: Any) -> None:
        """Store a successful answer (failures are not cached: a retry later may succeed); committed
        before this returns."""
        key = cache_key(backend, model, kind, prompt, params)
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        if self._conninfo is not None:
            with closing(self._pg_connect()) as conn, conn, conn.cursor() as cur:
                cur.execute(
                    f"INSERT INTO {PG_TABLE} (key, kind, value, created) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET kind = EXCLUDED.kind, value = EXCLUDED.value,"
                    " created = EXCLUDED.created",
                    (key, kind, text, time.time()),
                )
            return
        with self._lock, self._conn() as conn:  # commits on leaving
            conn.execute(
                "INSERT OR REPLACE INTO responses (key, kind, value, created) VALUES (?, ?, ?, ?)",
                (key, kind, text, time.time()),
            )

    def count(self, kind: str | None = None) -> int:
        """Stored answers (of one kind: 'complete' or 'simulate')."""
        where, args = ("WHERE kind = %s", (kind,)) if kind else ("", ())
        if self._conninfo is not None:
            with closing(self._pg_connect()) as conn, conn, conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {PG_TABLE} {where}", args)
                return int(cur.fetchone()[0])
        conn = self._conn()
        return int(conn.execute(f"SELECT count(*) FROM responses {where.replace('%s', '?')}", args).fetchone()[0])

    def __len__(self) -> int:
        return self.count()


class CachedBackend(LLMBackend):
    """Any backend, with every finished prompt stored as soon as it is answered: a run killed
    mid-layer resumes without redoing the neurons it finished."""

    def __init__(self, inner: LLMBackend, cache: LLMCache):
        self.inner, self.cache = inner, cache
        self.backend, self.model, self.batch_hint = inner.backend, inner.model, inner.batch_hint
        self.api = inner.api

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        key = asdict(params)
        # Chat prompts are keyed by their turns (and the api), so the two kinds of prompt never collide.
        texts = [p if isinstance(p, str) and self.api == "completions" else _chat_key(p) for p in prompts]
        out: list[Completion | LLMFailure | None] = []
        for text in texts:
            hit = self.cache.get(self.backend, self.model, "complete", text, key)
            out.append(Completion.from_record(hit, cached=True) if hit is not None else None)
        todo = [i for i, r in enumerate(out) if r is None]
        self.usage.add(cache_hits=len(prompts) - len(todo))
        for i, result in zip(todo, self.inner.complete([prompts[i] for i in todo], params), strict=True):
            if isinstance(result, Completion):
                self.cache.put(self.backend, self.model, "complete", texts[i], key, result.record())
            out[i] = result
        return [r for r in out if r is not None]


def _chat_key(prompt: Prompt) -> str:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return "chat:" + json.dumps(turns, ensure_ascii=False, sort_keys=True)


class CachedSimulator(Simulator):
    """Any simulator, with each explanation's simulated levels stored when finished."""

    def __init__(self, inner: Simulator, cache: LLMCache):
        self.inner, self.cache = inner, cache
        self.backend, self.model, self.prompt_version = inner.backend, inner.model, inner.prompt_version

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    def _key(self, explanation: str, sequences: Sequence[Sequence[str]]) -> tuple[str, dict[str, str]]:
        prompt = json.dumps({"explanation": explanation, "sequences": [list(s) for s in sequences]})
        return prompt, {"prompt_version": self.prompt_version}

    def _hit(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | None:
        hit = self.cache.get(self.backend, self.model, "simulate", *self._key(explanation, sequences))
        if hit is None:
            return None
        self.usage.add(cache_hits=1)
        return [np.asarray(v, dtype=np.float64) for v in hit]

    def _store(self, explanation: str, sequences: Sequence[Sequence[str]], result: JobResult) -> None:
        if not isinstance(result, LLMFailure) and not any(isinstance(v, LLMFailure) for v in result):
            values = [v.tolist() for v in result]  # type: ignore[union-attr]
            self.cache.put(self.backend, self.model, "simulate", *self._key(explanation, sequences), values)

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        hit = self._hit(explanation, sequences)
        if hit is not None:
            return hit
        result = self.inner.simulate(explanation, sequences)
        self._store(explanation, sequences, result)
        return result

    def simulate_many(self, jobs: Sequence[Job], on_result: OnJob | None = None) -> list[JobResult]:
        """Cached jobs are answered at once; the rest go to the inner simulator's `simulate_many`
        together (so a local simulator batches them) and are stored as each one finishes."""
        out: list[JobResult] = [[] for _ in jobs]
        missing: list[int] = []
        for i, job in enumerate(jobs):
            hit = self._hit(*job)
            if hit is None:
                missing.append(i)
                continue
            out[i] = hit
            if on_result is not None:
                on_result(i, hit)

        def finished(k: int, result: JobResult) -> None:
            i = missing[k]
            self._store(*jobs[i], result)
            if on_result is not None:
                on_result(i, result)

        if missing:
            results = self.inner.simulate_many([jobs[i] for i in missing], on_result=finished)
            for i, result in zip(missing, results, strict=True):
                out[i] = result
        return out

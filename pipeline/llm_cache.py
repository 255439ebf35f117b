"""A persistent cache of LLM responses, so a rerun (or a resumed layer) pays for no request twice.

SQLite from the standard library: several Dagster worker processes may share the file (WAL mode
plus a busy timeout make that safe), and each call opens its own connection, so threads need no
shared handle. Values are JSON, never pickle: the file is data, not code. The key is a sha256 of
what determines the answer (backend, model, kind of request, prompt, parameters); credentials are
no part of it and are never written.
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

from pipeline.llm import Completion, GenerationParams, LLMBackend, LLMFailure, Prompt, Usage
from pipeline.simulator import Simulator

DEFAULT_PATH = Path("warehouse") / "llm_cache.sqlite"
ENV_VAR = "NEURON_ATLAS_LLM_CACHE"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS responses"
    " (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
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


def default_cache_path() -> Path:
    """$NEURON_ATLAS_LLM_CACHE, else llm_cache.sqlite beside the warehouse file."""
    from pipeline.warehouse import default_database

    return Path(os.environ.get(ENV_VAR) or Path(default_database()).parent / DEFAULT_PATH.name)


class LLMCache:
    """get/put of JSON values by request; safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = 30.0):
        self.path = Path(path) if path is not None else default_cache_path()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # serialises this process's writers; SQLite's lock does the rest
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"LLMCache({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        return conn

    def get(self, backend: str, model: str, kind: str, prompt: str, params: dict[str, Any]) -> Any | None:
        """The stored value, or None when this exact request has not been answered before."""
        key = cache_key(backend, model, kind, prompt, params)
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, backend: str, model: str, kind: str, prompt: str, params: dict[str, Any], value: Any) -> None:
        """Store a successful answer (failures are not cached: a retry later may succeed)."""
        key = cache_key(backend, model, kind, prompt, params)
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        with self._lock, closing(self._connect()) as conn, conn:
            conn.execute(
                "INSERT OR REPLACE INTO responses (key, kind, value, created) VALUES (?, ?, ?, ?)",
                (key, kind, text, time.time()),
            )

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT count(*) FROM responses").fetchone()[0])


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

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        prompt = json.dumps({"explanation": explanation, "sequences": [list(s) for s in sequences]})
        params = {"prompt_version": self.prompt_version}
        hit = self.cache.get(self.backend, self.model, "simulate", prompt, params)
        if hit is not None:
            self.usage.add(cache_hits=1)
            return [np.asarray(v, dtype=np.float64) for v in hit]
        result = self.inner.simulate(explanation, sequences)
        if not isinstance(result, LLMFailure):
            self.cache.put(self.backend, self.model, "simulate", prompt, params, [v.tolist() for v in result])
        return result

"""A real llama.cpp OpenAI-compatible server (llama-cpp-python's `python -m llama_cpp.server`) on
127.0.0.1 for tests: started on a free port with a GGUF, waited for, and stopped as a process group.

Installed by `make llama-server` (scripts/llama_cpp_server.sh, which builds the wheel once into a
cache). Tests skip without it, unless NEURON_ATLAS_REQUIRE_LLAMA_SERVER is set (CI sets it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster_dev import free_port

REQUIRE_ENV = "NEURON_ATLAS_REQUIRE_LLAMA_SERVER"


def require_llama_server() -> None:
    """Skip (or, where required, fail) when llama-cpp-python's server is not installed."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        why = "llama-cpp-python[server] is not installed: run `make llama-server`"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{why} ({REQUIRE_ENV} is set)")
        pytest.skip(why)


@contextmanager
def llama_server(gguf: Path, log: Path, *extra: str, n_ctx: int = 2048, timeout_s: float = 900) -> Iterator[str]:
    """The server's base URL (http://127.0.0.1:PORT/v1) while it runs; its output goes to `log`."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", "2", "--n_batch", "512", "--logits_all", "true", *extra,
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                    json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not answer in {timeout_s:g} s") from None
                time.sleep(0.5)
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

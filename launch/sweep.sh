#!/usr/bin/env bash
# Run a sweep: launch/sweep.sh SWEEP.yaml [key=value ...]
# Trains one run per sweep value (runs/<sweep>/<key>=<value>/), evaluates each on
# the held-out split, then writes runs/<sweep>/results.{csv,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/sweep.sh SWEEP.yaml [key=value ...]" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { make venv >&2; }
exec "$PY" -m traser_jax.sweep "$@"

#!/usr/bin/env bash
# Train TRASER: launch/train.sh CONFIG [key=value ...]
#
#   one host:      launch/train.sh configs/demo.yaml optim.num_steps=300
#   TPU pod:       run the same command on every host (e.g. `gcloud compute tpus tpu-vm ssh NAME
#                  --worker=all --command "cd traser-jax && launch/train.sh configs/traser_3b.yaml"`);
#                  jax.distributed.initialize() finds its peers from the TPU metadata.
#   GPU cluster:   on every process set COORDINATOR_ADDRESS=host:port NUM_PROCESSES=N PROCESS_ID=i
#                  (under SLURM, srun's variables are read instead when these are unset).
#
# An unknown key is an error that lists the closest valid keys.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: launch/train.sh CONFIG [key=value ...]" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { make venv >&2; }
exec "$PY" -m traser_jax.train "$@"

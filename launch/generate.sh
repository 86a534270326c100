#!/usr/bin/env bash
# Generate SVG2 shards on a Ray cluster: launch/generate.sh VIDEOS OUT [generate options ...]
#
#   local Ray:      launch/generate.sh 'clips/*.mp4' shards/ --sam2-checkpoint sam2.1_hiera_large.pt
#   running cluster: RAY_ADDRESS=head-node:6379 launch/generate.sh 's3fs/clips/*.mp4' /shared/shards \
#                      --sam2-checkpoint /shared/sam2.1_hiera_large.pt
#   (start one with `ray start --head` on the head node and `ray start --address=HEAD:6379` on the others)
#
# Every node needs this repository installed (make venv), read access to the videos
# and the checkpoint, and the API key in its environment ($OPENAI_API_KEY, or the
# variable named by llm.api_key_env) before `ray start`: the key is never shipped
# through Ray. OUT must be on storage the driver (this process) can write; the
# cache (OUT/cache, or --cache DIR) must be shared by all nodes to be reused.
# Rerunning the same command resumes: written videos are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: launch/generate.sh VIDEOS OUT [--stages 1-6] [--set key=value ...]" >&2
  exit 2
fi
VIDEOS=$1
OUT=$2
shift 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { make venv >&2; }
ADDRESS=()
if [ -n "${RAY_ADDRESS:-}" ]; then
  ADDRESS=(--address "$RAY_ADDRESS")
fi
exec "$PY" -m data_gen.generate --videos "$VIDEOS" --out "$OUT" --engine ray "${ADDRESS[@]}" "$@"

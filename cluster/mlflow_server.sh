#!/usr/bin/env bash
# MLflow tracking server for studies and lead searches.
#
#   cluster/mlflow_server.sh [ROOT]        # ROOT default: $MLFLOW_ROOT or ./mlflow-server
#   MLFLOW_PORT=5001 cluster/mlflow_server.sh /shared/mlflow
#
# - sqlite backend (file stores are refused by MLflow 3) in ROOT/mlflow.db, also the model registry;
# - artifacts (checkpoints, configs) under ROOT/artifacts, served through the server, so clients
#   need no access to that folder;
# - binds 127.0.0.1 only: reach it from other machines through an SSH tunnel
#   (ssh -L 5000:127.0.0.1:5000 head-node), never by opening the port;
# - one worker process: sqlite takes one writer at a time, more workers only add lock contention.
#
# Then: ecgsearch tune ... --tracking-uri http://127.0.0.1:5000   (or export MLFLOW_TRACKING_URI)
set -euo pipefail

ROOT="${1:-${MLFLOW_ROOT:-$PWD/mlflow-server}}"
PORT="${MLFLOW_PORT:-5000}"
MLFLOW="${MLFLOW:-mlflow}"

mkdir -p "$ROOT/artifacts"
ROOT="$(cd "$ROOT" && pwd)"   # sqlite URIs need an absolute path

echo "MLflow: http://127.0.0.1:$PORT  store sqlite:///$ROOT/mlflow.db  artifacts $ROOT/artifacts" >&2
exec "$MLFLOW" server \
    --host 127.0.0.1 \
    --port "$PORT" \
    --workers 1 \
    --backend-store-uri "sqlite:///$ROOT/mlflow.db" \
    --artifacts-destination "$ROOT/artifacts" \
    --serve-artifacts

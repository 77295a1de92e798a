#!/usr/bin/env bash
# MLflow tracking server for studies and lead searches.
#
#   cluster/mlflow_server.sh [ROOT]          # local default: sqlite in ROOT (default $MLFLOW_ROOT or ./mlflow-server)
#   MLFLOW_BACKEND_URI=postgresql://mlflow:PASS@db:5432/mlflow MLFLOW_ARTIFACTS=s3://bucket/artifacts \
#       MLFLOW_WORKERS=4 cluster/mlflow_server.sh
#
# - backend: MLFLOW_BACKEND_URI (PostgreSQL for a cluster: concurrent writers, and not a sqlite
#   file on NFS, whose locking is unreliable), else sqlite in ROOT/mlflow.db on a local disk;
#   it also holds the model registry. File stores are refused by MLflow 3.
# - artifacts: MLFLOW_ARTIFACTS (s3://..., with MLFLOW_S3_ENDPOINT_URL for MinIO/Ceph), else
#   ROOT/artifacts; served through the server, so clients need no access to the bucket or folder.
# - binds MLFLOW_HOST, default 127.0.0.1: reach it through an SSH tunnel or kubectl port-forward,
#   never by opening the port.
# - workers: MLFLOW_WORKERS, default 1 (sqlite takes one writer at a time).
#
# Then: ecgsearch tune ... --tracking-uri http://127.0.0.1:5000   (or export MLFLOW_TRACKING_URI)
set -euo pipefail

ROOT="${1:-${MLFLOW_ROOT:-$PWD/mlflow-server}}"
PORT="${MLFLOW_PORT:-5000}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
WORKERS="${MLFLOW_WORKERS:-1}"
# An absolute path: the autoscaler's and a pod's PATH may not hold the venv.
MLFLOW="${MLFLOW:-$(dirname "$(readlink -f "$0")")/../.venv/bin/mlflow}"
[ -x "$MLFLOW" ] || MLFLOW="$(command -v mlflow)"

BACKEND="${MLFLOW_BACKEND_URI:-}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-}"
if [ -z "$BACKEND" ] || [ -z "$ARTIFACTS" ]; then
    mkdir -p "$ROOT/artifacts"
    ROOT="$(cd "$ROOT" && pwd)"   # sqlite URIs need an absolute path
fi
BACKEND="${BACKEND:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-$ROOT/artifacts}"

echo "MLflow: http://$HOST:$PORT  store ${BACKEND%%://*}://…  artifacts $ARTIFACTS" >&2
exec "$MLFLOW" server \
    --host "$HOST" \
    --port "$PORT" \
    --workers "$WORKERS" \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" \
    --serve-artifacts

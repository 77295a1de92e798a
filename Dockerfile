# ecgsearch image: Ray head/worker pods (KubeRay), `ray job` drivers, and the MLflow server.
#   CPU (default):  docker build -t ecgsearch:cpu .
#   CUDA:           docker build -t ecgsearch:cu128 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                       --build-arg TORCH_BUILD="" .
# torch goes in first from the chosen index (PyPI's Linux wheels are CUDA builds, so the CPU image
# asks PyTorch's CPU index for the +cpu build); everything else is pinned by constraints.txt.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_BUILD=+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    # Ray's token auth: the pods get RAY_AUTH_TOKEN from a Secret (cluster/k8s/raycluster.yaml).
    RAY_AUTH_MODE=token

# KubeRay probes and `ray start` need these; libgomp for torch's CPU kernels.
RUN apt-get update && apt-get install -y --no-install-recommends wget curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

WORKDIR /opt/ecgsearch
RUN pip install "torch==${TORCH_VERSION}${TORCH_BUILD}" --extra-index-url "${TORCH_INDEX}"
COPY pyproject.toml constraints.txt README.md ./
COPY ecgsearch ./ecgsearch
RUN pip install -c constraints.txt . \
    # the tracking server's Postgres driver and S3 client (cluster/k8s/mlflow.yaml)
    && pip install -c constraints.txt "psycopg[binary]" boto3
COPY jobs ./jobs
COPY cluster ./cluster

USER ray
CMD ["ecgsearch", "--help"]

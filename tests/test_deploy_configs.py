"""The deployable configs load, say what a safe cluster needs, and every command they run parses
with the real `ecgsearch` parser (an option renamed in the CLI fails here, not on a cluster)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ecgsearch.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "cluster" / "k8s"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _token_from_secret(container: dict) -> None:
    env = _env(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], container["name"]


def test_raycluster_head_runs_no_trials_gpu_workers_share_a_volume_and_auth_is_a_secret():
    cluster, pvc = _docs(K8S / "raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu, "no GPU worker group"
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        c = pod["containers"][0]
        _token_from_secret(c)
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_rayjob_targets_the_cluster_and_its_entrypoint_parses():
    (job,) = _docs(K8S / "rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == "ecgsearch"
    _token_from_secret(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert int(runtime["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
    commands = [c.strip() for c in job["spec"]["entrypoint"].split("&&")]
    assert len(commands) == 2
    for cmd in commands:
        parse_job_command(cmd)


def test_mlflow_server_on_postgres_and_s3_behind_a_clusterip_service():
    deploy, service = _docs(K8S / "mlflow.yaml")
    assert deploy["kind"] == "Deployment" and service["kind"] == "Service"
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 5000
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env = _env(c)
    assert "secretKeyRef" in env["MLFLOW_BACKEND_URI"]["valueFrom"]
    assert env["MLFLOW_ARTIFACTS"]["value"].startswith("s3://") and c["command"][-1] == "cluster/mlflow_server.sh"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


# Kubernetes schema version checked against (kubernetes-validate bundles the core schemas).
K8S_VERSION = "1.33.0"
# KubeRay v1 CRD fields (ray.io/v1): a misspelt key is dropped by the API server with a warning,
# so a typo here would silently lose a setting on a real cluster.
KUBERAY_FIELDS = {
    "RayCluster.spec": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                        "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
                        "gcsFaultToleranceOptions", "upgradeStrategy"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
    "workerGroupSpecs": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                         "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"},
    "RayJob.spec": {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "submitterPodTemplate",
                    "submitterConfig", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                    "activeDeadlineSeconds", "backoffLimit", "submissionMode", "suspend", "entrypointNumCpus",
                    "entrypointNumGpus", "entrypointResources", "jobId", "metadata", "deletionStrategy",
                    "managedBy"},
}


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]]
    return []


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "mlflow.yaml"])
def test_manifests_validate_against_the_kubernetes_and_kuberay_schemas(name):
    """Core kinds and every pod template inside a KubeRay resource against Kubernetes' own schemas
    (strict: unknown fields fail); KubeRay's own fields against its v1 field names."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    for doc in _docs(K8S / name):
        kind = doc["kind"]
        if kind in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", kind
            assert set(doc["spec"]) <= KUBERAY_FIELDS[f"{kind}.spec"], set(doc["spec"]) - KUBERAY_FIELDS[f"{kind}.spec"]
            if kind == "RayCluster":
                groups = [("headGroupSpec", doc["spec"]["headGroupSpec"])] + \
                         [("workerGroupSpecs", g) for g in doc["spec"]["workerGroupSpecs"]]
                for field, group in groups:
                    assert set(group) <= KUBERAY_FIELDS[field], (field, set(group) - KUBERAY_FIELDS[field])
                    # KubeRay's rayStartParams is map[string]string: a YAML number is refused
                    assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
            for template in _pod_templates(doc):
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                             "template": template}, K8S_VERSION, strict=True)
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    (deploy, _) = _docs(K8S / "mlflow.yaml")
    deploy["spec"]["template"]["spec"]["containers"][0]["imagee"] = deploy["spec"]["template"]["spec"][
        "containers"][0].pop("image")
    with pytest.raises(kv.ValidationError, match="imagee"):
        kv.validate(deploy, K8S_VERSION, strict=True)


def test_cluster_yaml_is_safe_to_bring_up():
    doc = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    starts = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
    for cmd in starts:
        if "ray " in cmd:
            assert cmd.startswith("RAY_AUTH_MODE=token ") and " /home/ecg/ecgsearch/.venv/bin/ray " in cmd, cmd
        if "ray start" in cmd:                                          # jobs' `python` is the venv's
            assert "PATH=/home/ecg/ecgsearch/.venv/bin:$PATH" in cmd, cmd
    head = next(c for c in doc["head_start_ray_commands"] if "ray start" in c)
    assert "--num-cpus=0" in head and "--dashboard-host=127.0.0.1" in head
    server = next(c for c in doc["head_start_ray_commands"] if "mlflow_server.sh" in c)
    assert "/shared" not in server                                      # sqlite not on NFS
    assert any("auth_token" in k for k in doc["file_mounts"])
    for cmd in doc["setup_commands"] + starts:
        assert "~" not in cmd, cmd


def test_dockerfile_cpu_by_default_with_a_cuda_build_argument():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and "ARG TORCH_BUILD=+cpu" in text
    assert "-c constraints.txt" in text and "psycopg[binary]" in text
    assert re.search(r"^FROM python:3\.11", text, re.M)


def test_runtime_env_ships_the_checkout_and_gives_the_driver_time_to_stop():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


def _commands_in(text: str) -> list[str]:
    """Shell commands in a file's code blocks and comments: `ecgsearch ...` and `python jobs/...`,
    with backslash continuations joined."""
    joined = re.sub(r"\\+\s*\n\s*(#\s*)?", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip().lstrip("#").strip()
        m = re.search(r"(?:^|--\s+|\$ )((?:ecgsearch|python jobs/\w+\.py)\s.*)$", line)
        if m and "`" not in m.group(1):
            found.append(m.group(1).split(" #")[0].strip())
    return found


@pytest.mark.parametrize("doc", ["README.md", "jobs/README.md", "cluster/cluster.yaml", "jobs/tune_job.py",
                                 "jobs/rle_job.py", "cluster/runtime_env.yaml"])
def test_every_documented_command_parses(doc):
    commands = _commands_in((REPO / doc).read_text())
    assert commands, f"no command found in {doc}"
    for cmd in commands:
        parse_job_command(cmd)


def parse_job_command(command: str) -> None:
    """Parse one documented command as the real entry point would, failing with the command."""
    import importlib.util

    argv = shlex.split(command)
    try:
        if argv[0] == "ecgsearch":
            build_parser().parse_args(argv[1:])
            return
        assert argv[0] == "python" and argv[1].startswith("jobs/"), command
        args = argv[2:]
        if argv[1] == "jobs/tune_job.py":
            build_parser().parse_args(["tune", *args])
            return
        assert argv[1] == "jobs/rle_job.py", command
        spec = importlib.util.spec_from_file_location("rle_job", REPO / "jobs" / "rle_job.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        rle_args, k = mod.split_args(args)
        build_parser().parse_args(["rle", *rle_args])
        if k is not None:
            build_parser().parse_args(["subsets", "--k", str(k), *mod.shared_args(rle_args)])
    except SystemExit as exc:
        raise AssertionError(f"does not parse ({exc}): {command}") from None

"""Start or join Ray, and size trials and concurrency from what the cluster holds.

The same command runs on a laptop and as a `ray job submit` entry point: with RAY_ADDRESS
set (Ray sets it for submitted jobs) we join that cluster, otherwise we start a local one.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ecgsearch.distributed")

# The folder holding the `ecgsearch` package: put on PYTHONPATH for a local cluster so Ray's
# worker processes import the same working tree as the driver even without `pip install -e .`.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])


class ClusterError(RuntimeError):
    """Ray cannot be reached, or the cluster cannot hold one trial."""


@dataclass
class ClusterSettings:
    address: str | None = None            # None: RAY_ADDRESS when set, else start a local Ray
    num_cpus: int | None = None           # local Ray only (None: all cores)
    num_gpus: int | None = None           # local Ray only
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Ray Train V2 needs the dashboard's state API: when Tune stops a trial (ASHA) its trainer's
    # controller dies abruptly, and only the PlacementGroupCleaner, which asks the state API
    # whether the controller is alive, frees the workers' CPUs. Without it they leak and later
    # trials wait forever. It binds 127.0.0.1.
    include_dashboard: bool = True


def ensure_ray(settings: ClusterSettings | None = None) -> str:
    """Make sure this process is connected to Ray: 'reused', 'joined' or 'started'."""
    import ray

    s = settings or ClusterSettings()
    if ray.is_initialized():
        return "reused"
    address = s.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"runtime_env": s.runtime_env or None, "log_to_driver": True}
    if address:
        if s.num_cpus is not None or s.num_gpus is not None:
            raise ClusterError(f"num_cpus/num_gpus size a local Ray only; the cluster at {address} "
                               "has its own resources")
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"could not join the Ray cluster at RAY_ADDRESS={address}: {exc}") from None
        log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        return "joined"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _CODE_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_CODE_ROOT, *paths])
    if s.include_dashboard:
        # Ray's own processes find the state API by auto-detecting "the" local Ray, which fails
        # as soon as a second Ray runs on the machine (another study, a test run). Pin the
        # dashboard to a port chosen here and tell every process of this cluster (they inherit
        # the raylet's environment, which is ours) where it is.
        port = _free_port()
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=s.num_cpus, num_gpus=s.num_gpus, include_dashboard=s.include_dashboard,
             dashboard_host="127.0.0.1", **kwargs)
    log.info("started local Ray: %s", ray.cluster_resources())
    return "started"


def stop_ray() -> None:
    """Shut down this process's Ray and forget the state-API address `ensure_ray` pinned."""
    import ray

    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_state_api(wait_s: float = 15.0) -> None:
    """Fail fast when Ray's state API (served by the dashboard) is down.

    Ray Train frees a stopped trial's worker resources through a cleaner that asks this API
    whether the trial's controller is alive; without it every trial that ASHA stops keeps its
    CPUs/GPUs and the study stalls once the cluster is full.
    """
    import time

    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            list_actors(limit=1, timeout=5, raise_on_missing_output=False)
            return
        except RayStateApiException as exc:
            if time.monotonic() > deadline:  # a dashboard still starting up gets a few seconds
                raise ClusterError("Ray's state API does not answer (is the dashboard running? start the "
                                   f"cluster without --include-dashboard=false): {exc}") from None
            time.sleep(1.0)


@dataclass(frozen=True)
class TrialResources:
    """What one trial's TorchTrainer asks for: `workers` x (CPUs [+ GPUs]) per worker."""
    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res

    def total(self) -> dict[str, float]:
        return {k: v * self.workers for k, v in self.per_worker().items()}


def plan_trial_resources(workers: int, gpus_per_trial: float | None, cluster: dict[str, float],
                         cpus_per_worker: float = 1.0) -> TrialResources:
    """Resources per worker. gpus_per_trial None: one GPU per worker when the cluster has enough."""
    if int(workers) != workers or workers < 1:
        raise ValueError(f"invalid setting workers-per-trial={workers}: must be a whole number >= 1")
    if not cpus_per_worker > 0:
        raise ValueError(f"invalid setting cpus-per-worker={cpus_per_worker}: must be > 0")
    have_gpus = float(cluster.get("GPU", 0.0))
    if gpus_per_trial is None:
        gpus_per_trial = float(workers) if have_gpus >= workers else 0.0
    if gpus_per_trial < 0:
        raise ValueError(f"invalid setting gpus-per-trial={gpus_per_trial}: must be >= 0")
    if gpus_per_trial == 0:
        return TrialResources(int(workers), cpus_per_worker, 0.0)
    if have_gpus <= 0:
        raise ClusterError(f"gpus-per-trial={gpus_per_trial} but the Ray cluster has no GPUs "
                           f"(resources: {_show(cluster)}); use --gpus-per-trial 0")
    per = gpus_per_trial / workers
    # NCCL refuses two ranks on one device, so a multi-worker trial needs whole GPUs per worker;
    # a one-worker trial may take a fraction to pack several trials on a GPU.
    if workers > 1 and (per < 1 or per != int(per)):
        raise ValueError(f"invalid settings gpus-per-trial={gpus_per_trial} with workers-per-trial={workers}: "
                         "each DDP worker needs a whole number of GPUs (>= 1)")
    return TrialResources(int(workers), cpus_per_worker, per)


def max_concurrent_trials(res: TrialResources, cluster: dict[str, float], requested: int | None,
                          trials: int) -> int:
    """How many trials may run at once: `requested` when given, else what the cluster fits."""
    need = res.total()
    fits = min(math.floor(float(cluster.get(k, 0.0)) / v + 1e-9) for k, v in need.items())
    if fits < 1:
        raise ClusterError(f"one trial needs {_show(need)} but the Ray cluster has {_show(cluster)}; "
                           "lower --workers-per-trial / --gpus-per-trial or add nodes")
    if requested is not None:
        if int(requested) != requested or requested < 1:
            raise ValueError(f"invalid setting max-concurrent={requested}: must be a whole number >= 1")
        if requested > fits:
            log.warning("max-concurrent=%d exceeds the %d trial(s) the cluster fits now; the rest will queue",
                        requested, fits)
        return int(min(requested, trials))
    return int(max(1, min(fits, trials)))


def _show(res: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in res] or sorted(res)
    return ", ".join(f"{k}={res[k]:g}" for k in keys)

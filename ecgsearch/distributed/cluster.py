"""Start or join Ray, and size trials and concurrency from what the cluster holds.

The same command runs on a laptop and as a `ray job submit` entry point: with RAY_ADDRESS
set (Ray sets it for submitted jobs) we join that cluster, otherwise we start a local one.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ecgsearch.distributed")
# What we say about Ray itself (resources, session folder): Ray's business, so it goes where
# Ray's own records go (see `route_ray_output`), while our warnings stay on the console.
ray_log = logging.getLogger("ecgsearch.ray")

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
    # A local Ray's GCS, raylet, object manager and workers listen on this address. Loopback: nothing
    # outside this machine reaches them (Ray's default is the machine's own address). A head that
    # other nodes join is started with `ray start --head` instead (cluster/cluster.yaml).
    node_ip: str = "127.0.0.1"
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Ray Train V2 needs the dashboard's state API: when Tune stops a trial (ASHA) its trainer's
    # controller dies abruptly, and only the PlacementGroupCleaner, which asks the state API
    # whether the controller is alive, frees the workers' CPUs. Without it they leak and later
    # trials wait forever. It binds 127.0.0.1.
    include_dashboard: bool = True
    # Forward the workers' stdout/stderr (the "(pid=...)" lines) to this console. None: not while
    # `route_ray_output` keeps Ray quiet, else yes. It is fixed when this driver connects.
    log_to_driver: bool | None = None


# Loggers whose records are Ray's (and the libraries a study drives) verbose output. Each has its
# own console handler and does not propagate, so routing them means swapping handlers.
_ROUTED = ("ray", "ray.data", "optuna", "mlflow", "alembic", "ecgsearch.ray")
_quiet = {"log_to_driver": True}  # what `ensure_ray` uses when ClusterSettings leaves it None


@contextlib.contextmanager
def route_ray_output(log_file: Path, verbose: bool) -> Iterator[Path]:
    """Within the block, Ray's, Tune's, Train's, Optuna's and MLflow's log records go to `log_file`;
    unless `verbose`, only there, and Ray stays off the console:

    - a driver that `ensure_ray` connects here gets `log_to_driver=False`: the workers' output
      stays in Ray's session log folder (named in `log_file`); trial errors still come back
      through Tune's results, which our code reports;
    - Tune uses its legacy output engine, which at `verbose=0` prints nothing (the new engine
      prints its configuration and final trial tables and a TensorBoard hint at any verbosity);
    - messages the raylet pushes to the driver ("(raylet) WARNING: 8 PYTHON worker processes
      ...") go to `log_file`: Ray prints them whatever `log_to_driver` says.

    With `verbose` the records go to the console as before and to `log_file` as well. Everything
    is restored on exit, so one process can run several commands (the demo does).
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    with contextlib.ExitStack() as stack:
        stack.callback(handler.close)
        stack.callback(_reroute_loggers(handler, verbose))
        before = _quiet["log_to_driver"]
        _quiet["log_to_driver"] = bool(verbose)
        stack.callback(_quiet.__setitem__, "log_to_driver", before)
        if not verbose:
            stack.enter_context(_env("RAY_AIR_NEW_OUTPUT", "0"))
            stack.enter_context(_raylet_messages_to_log())
        yield log_file


def _reroute_loggers(handler: logging.Handler, verbose: bool):
    """Add `handler` to the routed loggers (unless verbose, instead of their console handlers);
    returns the function that undoes it."""
    # These install their console handlers when imported: import them first, then reroute.
    for module in ("ray", "ray.data", "optuna", "mlflow"):
        importlib.import_module(module)
    # Ray gives some sub-loggers (ray.data ...) console handlers of their own.
    names = set(_ROUTED) | {n for n, lg in list(logging.Logger.manager.loggerDict.items())
                            if n.startswith("ray.") and isinstance(lg, logging.Logger) and lg.handlers}
    saved = []
    for name in sorted(names):
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate))
        if verbose:
            parts = name.split(".")
            if not (lg.propagate and any(".".join(parts[:i]) in names for i in range(1, len(parts)))):
                lg.addHandler(handler)   # (a propagating child reaches its routed parent's file anyway)
            continue
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)      # console handlers only: Ray's own session files keep theirs
        lg.addHandler(handler)
        lg.propagate = False

    def restore() -> None:
        for lg, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
    return restore


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _raylet_messages_to_log() -> Iterator[None]:
    # The driver's error-listener thread prints what the raylet pushes through the module-level
    # `print_to_stdstream`, looked up at each call, so swapping it reroutes them. A private API:
    # if a Ray upgrade moves it, those lines simply reach the console again.
    import ray._private.worker as worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        yield
        return

    def to_log(data, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            ray_log.warning("(%s) %s", data.get("pid"), line)

    worker.print_to_stdstream = to_log
    try:
        yield
    finally:
        worker.print_to_stdstream = original


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init replaces a driver's SIGTERM handler with one that exits at once (SystemExit). The
    CLI's handler turns SIGTERM (`ray job stop`) into an interrupt, so Tune stops its trials in
    order and every MLflow run ends KILLED: keep it when there is one."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _node_ip(address: str):
    """ray.init swaps a loopback address (a node's, or the cluster address it joins) for the
    machine's own, unless Ray thinks clusters are off (its Windows/macOS default): say so while it
    starts or joins, so loopback stays loopback. Every process it starts is handed the resolved
    address. A private constant: should an upgrade move it, Ray uses the machine's address as before."""
    from ray._private import ray_constants

    if address not in ("127.0.0.1", "localhost", "::1") or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def ensure_ray(settings: ClusterSettings | None = None) -> str:
    """Make sure this process is connected to Ray: 'reused', 'joined' or 'started'."""
    import ray

    s = settings or ClusterSettings()
    if ray.is_initialized():
        return "reused"
    address = s.address or os.environ.get("RAY_ADDRESS") or None
    log_to_driver = _quiet["log_to_driver"] if s.log_to_driver is None else s.log_to_driver
    kwargs: dict[str, Any] = {"runtime_env": s.runtime_env or None, "log_to_driver": log_to_driver}
    if address:
        if s.num_cpus is not None or s.num_gpus is not None:
            raise ClusterError(f"num_cpus/num_gpus size a local Ray only; the cluster at {address} "
                               "has its own resources")
        try:
            # A loopback address stays loopback: Ray would dial the machine's own address instead,
            # where a loopback-only head does not listen.
            host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
            with _keep_sigterm_handler(), _node_ip(host):
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"could not join the Ray cluster at RAY_ADDRESS={address}: {exc}") from None
        ray_log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        _log_session()
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
    with _keep_sigterm_handler(), _node_ip(s.node_ip):
        ray.init(num_cpus=s.num_cpus, num_gpus=s.num_gpus, include_dashboard=s.include_dashboard,
                 dashboard_host="127.0.0.1", _node_ip_address=s.node_ip, **kwargs)
    ray_log.info("started local Ray: %s", ray.cluster_resources())
    _log_session()
    return "started"


def _log_session() -> None:
    # Where the workers' stdout/stderr went when they are not forwarded here. A private API,
    # for a log line only: losing it on a Ray upgrade must not stop a study.
    try:
        from ray._private.worker import _global_node

        ray_log.info("Ray session logs (workers' stdout/stderr): %s", _global_node.get_logs_dir_path())
    except Exception:
        pass


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

"""MLflow tracking shared by tuning studies and the lead search (RLE).

Everything goes through an explicit run id and one `MlflowClient`: no fluent "active run",
so threads, Tune callbacks and several studies in one process never log into each other.

API
---
tracking_uri_for(out_dir, uri=None) -> str
    `uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<out_dir>/mlflow.db`. File stores are refused.
preflight(uri, timeout_s=5) -> None
    Fails fast (TrackingError, names the URI and the fix) when the store does not answer.
    Call it before any training starts.
run_name(*parts) -> str
    Deterministic run name ("study-a/trial-3"): the same work gets the same name on a rerun,
    which is how `--resume` finds its runs again.
Tracker(uri, experiment)                  one experiment (get-or-create); artifacts for sqlite
                                          stores go next to the database (mlartifacts/)
    .start_parent(run_name, params=None, tags=None) -> run_id
    .start_child(parent_id, run_name, params=None, tags=None) -> run_id
        Both reuse an existing run of that name (and parent) and set it RUNNING again (resume).
    .parent_run(...) / .child_run(parent_id, ...)  context managers yielding the run id; the run
        always ends: FINISHED on success, FAILED on an exception, KILLED on KeyboardInterrupt/SystemExit.
    .end_run(run_id, status)   .children(parent_id)
    .find_run(run_name, parent_id=None, top_level=False)   newest run of that name (under parent)
    .log_params(run_id, params)       nested dicts flatten to dotted keys; lists become JSON
    .log_config(run_id, config_dict)  params + the whole dict as config.json
    .log_epoch_metrics(run_id, metrics, epoch)  numeric values only, step = epoch
    .set_tags / .log_artifact / .log_dict
    .register_model(run_id, artifact_path, name, tags=None) -> version string
    .close_stale_children(parent_id, status="KILLED")  runs a killed driver left RUNNING
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("ecgsearch.mlflow")

STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The tracking store is unusable: bad URI, or a server that does not answer."""


def tracking_uri_for(out_dir: str | Path, uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return "sqlite:///" + str((Path(out_dir) / "mlflow.db").resolve())
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme in ("", "file"):
        raise TrackingError(f"tracking URI {uri!r} is a file store, which MLflow refuses; use "
                            "sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000 (cluster/mlflow_server.sh)")
    return uri


def _sqlite_path(uri: str) -> Path:
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        raise TrackingError(f"tracking URI {uri!r}: give a database file, e.g. sqlite:////abs/path/mlflow.db")
    return Path(path)


def preflight(uri: str, timeout_s: float = 5.0) -> None:
    """Check the store answers, quickly, so a dead server fails before any training starts."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only)
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered HTTP {resp.status} on /health")
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"MLflow tracking server {uri} answered HTTP {exc.code} ({exc.reason}) on "
                                "/health; check the server's log") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} does not answer ({reason}); start it "
                                "(cluster/mlflow_server.sh) or pass another --tracking-uri / "
                                "MLFLOW_TRACKING_URI") from None
        return
    if uri.startswith("sqlite:"):
        db = _sqlite_path(uri)
        if not db.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: folder {db.parent} is not writable")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # any store error means we cannot log: say which store and why
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {exc}") from None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_name(*parts: object) -> str:
    name = "/".join(str(p) for p in parts if str(p))
    if not name or "'" in name or '"' in name:
        raise ValueError(f"run name {name!r} must be non-empty and free of quotes")
    return name


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(key: str, v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v, default=str)
    if len(text) > _MAX_PARAM_LEN:
        raise ValueError(f"MLflow param {key!r} is {len(text)} characters; the limit is {_MAX_PARAM_LEN}")
    return text


class Tracker:
    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.client = _client(uri)
        self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            # Without this MLflow puts artifacts in ./mlruns of whatever folder the driver runs in.
            location = (_sqlite_path(self.uri).parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- runs ------------------------------------------------------------------
    def find_run(self, name: str, parent_id: str | None = None, *, top_level: bool = False):
        """The newest run of that name (under `parent_id`; with top_level, one without a parent)."""
        flt = f"attributes.run_name = '{run_name(name)}'"
        if parent_id:
            flt += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt,
                                       order_by=["attributes.start_time DESC"], max_results=50)
        if top_level:
            runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return runs[0] if runs else None

    def _start(self, name: str, parent_id: str | None, params, tags) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        found = self.find_run(name, parent_id, top_level=parent_id is None)
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            tags["ecgsearch.resumed"] = str(int(found.data.tags.get("ecgsearch.resumed", "0")) + 1)
            self.set_tags(run_id, tags)
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name(name), tags=tags).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def start_parent(self, name: str, params=None, tags=None) -> str:
        return self._start(name, None, params, tags)

    def start_child(self, parent_id: str, name: str, params=None, tags=None) -> str:
        return self._start(name, parent_id, params, tags)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"run status {status!r}: choose one of {', '.join(STATUSES)}")
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def _run(self, run_id: str) -> Iterator[str]:
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            try:
                self.end_run(run_id, status)
            except Exception as exc:  # never hide the error that ended the block
                log.error("could not end MLflow run %s as %s: %s", run_id, status, exc)

    @contextmanager
    def parent_run(self, name: str, params=None, tags=None) -> Iterator[str]:
        with self._run(self.start_parent(name, params, tags)) as run_id:
            yield run_id

    @contextmanager
    def child_run(self, parent_id: str, name: str, params=None, tags=None) -> Iterator[str]:
        with self._run(self.start_child(parent_id, name, params, tags)) as run_id:
            yield run_id

    def children(self, parent_id: str) -> list:
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                       max_results=5000)

    def close_stale_children(self, parent_id: str, status: str = "KILLED") -> list[str]:
        closed = [r.info.run_id for r in self.children(parent_id) if r.info.status == "RUNNING"]
        for run_id in closed:
            self.end_run(run_id, status)
        return closed

    # -- logging -----------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, _param_value(k, v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        self.log_params(run_id, {f"cfg.{k}": v for k, v in flatten(config).items()})
        self.log_dict(run_id, dict(config), "config.json")

    def log_epoch_metrics(self, run_id: str, metrics: Mapping[str, Any], epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(epoch)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isinf(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def register_model(self, run_id: str, artifact_path: str, name: str, tags=None) -> str:
        """Register `<run artifacts>/<artifact_path>` as a new version of registered model `name`."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
        mv = self.client.create_model_version(name, source=source, run_id=run_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()})
        return str(mv.version)

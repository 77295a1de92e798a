"""The synchronous MLflow side of tracking: URI rules, preflight, and `Store`, the one place
that talks to an `MlflowClient`. Only the writer thread (writer.py) calls a `Store`, so no
MLflow call ever runs on Tune's event loop or the search driver.

Everything goes through explicit run ids: no fluent "active run", so threads, Tune callbacks
and several studies in one process never log into each other.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("ecgsearch.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_PARAM_LEN = 6000    # MLflow's limit on a param value
_MAX_TAG_LEN = 8000      # ... and on a tag value
# Without this tag MLflow 3 opens an experiment in its GenAI view; these are training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's defaults (7 retries, 120 s timeout, backoff factor 2) make one call to a dead server
# take ~4 minutes (measured: 246 s). The writer retries on its own schedule, so one attempt plus
# two quick retries is enough. The last one stops MLflow writing "View run ... at" to stdout (and
# fetching the run again to do it) every time a run ends on a server. An operator's own values
# in the environment win.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingError(ValueError):
    """The tracking store is unusable: bad URI, or a server that does not answer. A ValueError:
    it is a setting (--tracking-uri / MLFLOW_TRACKING_URI) that points at nothing usable."""


def bound_http_calls() -> None:
    """MLflow reads these at every request, process-wide: set them before the first call."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


DEFAULT_STORE = "mlflow.db"   # in the working directory: every command's default, one store, one UI


def tracking_uri_for(uri: str | None = None, root: str | Path | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<root>/mlflow.db` with `root` the working
    directory: studies, lead searches, subsets and reconstructions run from one folder share one
    store (artifacts beside it in mlartifacts/), which `mlflow ui` in that folder shows whole.
    File stores are refused."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return "sqlite:///" + str((Path.cwd() if root is None else Path(root)).resolve() / DEFAULT_STORE)
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


def health(uri: str, timeout_s: float = 3.0) -> str | None:
    """None when an http(s) tracking server answers /health with 200, else why not. One short
    request, no retries: the writer probes with this before replaying its backlog."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:  # noqa: S310
            return None if resp.status == 200 else f"HTTP {resp.status} on /health"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} ({exc.reason}) on /health"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return str(getattr(exc, "reason", exc))


def preflight(uri: str, timeout_s: float = 5.0) -> None:
    """Check the store answers, quickly, so a dead server fails before any training starts."""
    bound_http_calls()
    if uri.startswith(("http://", "https://")):
        reason = health(uri, timeout_s)
        if reason is not None and reason.startswith("HTTP"):
            raise TrackingError(f"MLflow tracking server {uri} answered {reason}; check the server's log")
        if reason is not None:
            raise TrackingError(f"MLflow tracking server {uri} does not answer ({reason}); start it "
                                "(cluster/mlflow_server.sh) or pass another --tracking-uri / "
                                "MLFLOW_TRACKING_URI")
        return
    if uri.startswith("sqlite:"):
        db = _sqlite_path(uri)
        if not db.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: folder {db.parent} is not writable")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # any store error means we cannot log: say which store and why
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {exc}") from None


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_name(*parts: object) -> str:
    """Deterministic run name ("study-a/trial-3"): the same work gets the same name on a rerun,
    which is how a resumed study or search finds its child runs again."""
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


def param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params as MLflow stores them; nested dicts become dotted keys, lists JSON.
    Checked when the caller logs them, so a bad value fails there and not in the writer."""
    out = {}
    for key, v in flatten(params).items():
        text = v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v, default=str)
        if len(text) > _MAX_PARAM_LEN:
            raise ValueError(f"MLflow param {key!r} is {len(text)} characters; the limit is {_MAX_PARAM_LEN}")
        out[key] = text
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    # Strings and booleans are not metrics; NaN/inf are stored inconsistently by MLflow
    # backends, so an undefined metric is simply not logged.
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def tag_value(v: Any) -> str:
    text = str(v)
    return text if len(text) <= _MAX_TAG_LEN else text[:_MAX_TAG_LEN - 3] + "..."


class Store:
    """One MLflow store. Every method is one logical call the writer can retry as a whole."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = client(uri)
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        from mlflow.exceptions import MlflowException

        key, value = EXPERIMENT_KIND
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                # Without this MLflow puts artifacts in ./mlruns of whatever folder the driver runs in.
                location = (_sqlite_path(self.uri).parent / "mlartifacts").resolve().as_uri()
            try:
                exp_id = self.client.create_experiment(name, artifact_location=location, tags={key: value})
            except MlflowException:  # another process created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp is not None:
            exp_id = exp.experiment_id
            if exp.tags.get(key) != value:   # made by an older version, or by hand
                self.client.set_experiment_tag(exp_id, key, value)
        self._experiments[name] = exp_id
        return exp_id

    def find_run(self, experiment: str, name: str, parent_id: str | None):
        """The newest run of that name under `parent_id` (None: a top-level run), or None."""
        flt = f"attributes.run_name = '{run_name(name)}'"
        if parent_id:
            flt += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id(experiment)], filter_string=flt,
                                       order_by=["attributes.start_time DESC"], max_results=50)
        if not parent_id:
            runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return runs[0] if runs else None

    def create_run(self, experiment: str, name: str, parent_id: str | None, tags: Mapping[str, str],
                   reuse: bool) -> str:
        """A new run; with `reuse`, the run of that name under the parent if there is one, set
        RUNNING again (a resumed study/search, or a backlog replayed after a partial success)."""
        tags = dict(tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        found = self.find_run(experiment, name, parent_id) if reuse else None
        if found is None:
            return self.client.create_run(self.experiment_id(experiment), run_name=run_name(name),
                                          tags=tags).info.run_id
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        tags["resumed"] = str(int(found.data.tags.get("resumed", "0")) + 1)
        self.set_tags(run_id, tags)
        return run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def close_stale_children(self, run_id: str, status: str) -> list[str]:
        """End the children a killed driver left RUNNING."""
        exp = self.client.get_run(run_id).info.experiment_id
        runs = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                                            "attributes.status = 'RUNNING'", max_results=5000)
        for r in runs:
            self.end(r.info.run_id, status)
        return [r.info.run_id for r in runs]

    def settle_children(self, run_id: str, statuses: Mapping[str, str], others: str | None) -> None:
        """Children named in `statuses` end in that status; other children still RUNNING in `others`."""
        exp = self.client.get_run(run_id).info.experiment_id
        for r in self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                                         max_results=5000):
            want = statuses.get(r.info.run_name) or (others if r.info.status == "RUNNING" else None)
            if want and r.info.status != want:
                self.end(r.info.run_id, want)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, float(v), timestamp_ms, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, tag_value(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact {path} no longer exists")
        if Path(path).is_dir():   # a model folder: its files under artifact_path/
            self.client.log_artifacts(run_id, path, artifact_path)
        else:
            self.client.log_artifact(run_id, path, artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def register_model(self, run_id: str, artifact_path: str, name: str, tags: Mapping[str, str],
                       alias: str | None = None) -> str:
        """Register `<run artifacts>/<artifact_path>` as a version of `name` (and point `alias` at
        it). Idempotent for the same run, path and tags (a replayed backlog must not add a second
        version)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
        version = None
        for mv in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.source == source and all(mv.tags.get(k) == v for k, v in tags.items()):
                version = str(mv.version)
        if version is None:
            version = str(self.client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags)).version)
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        return version


def now_ms() -> int:
    return int(time.time() * 1000)

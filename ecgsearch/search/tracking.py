"""MLflow bookkeeping for lead searches: one parent run, child runs per step and candidate.

A thin layer over `ecgsearch.distributed.mlflow_log` (explicit run ids, runs that always
end, children found again by name on resume), plus a no-op tracker for `--no-tracking`.
Logging happens in the driver as Tune trials finish, so runs appear in the order
candidates complete; run names are deterministic (`step03-without-V2`), which is how a
resumed search finds its runs instead of logging a finished candidate twice.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("ecgsearch.search")


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    # MLflow backends store NaN inconsistently; an undefined metric is simply not logged.
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Tracker:
    """No-op tracker (tracking disabled). Every method accepts run id None."""

    enabled = False
    uri: str | None = None

    def parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
               run_id: str | None = None) -> str | None:
        return None

    def child(self, parent_id: str | None, name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
              finish: bool = True) -> str | None:
        return None

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def log_artifacts(self, run_id: str | None, paths: Iterable[str | Path]) -> None:
        pass

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        pass

    def tag(self, run_id: str | None, key: str, value: str) -> None:
        pass

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    enabled = True

    def __init__(self, uri: str, experiment: str):
        from ecgsearch.distributed import mlflow_log as ml

        self.uri = uri
        try:
            ml.preflight(uri)   # a dead server fails here, before any training
        except ml.TrackingError as exc:
            raise ValueError(str(exc)) from None
        self.t = ml.Tracker(uri, experiment)

    def parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
               run_id: str | None = None) -> str:
        if run_id is not None:
            # Resume: reopen our own parent and close children a killed driver left RUNNING.
            self.t.client.update_run(run_id, status="RUNNING")
            stale = self.t.close_stale_children(run_id, "KILLED")
            if stale:
                log.info("closed %d MLflow child run(s) left RUNNING by the interrupted search", len(stale))
            return run_id
        # A fresh search always gets a new parent run, even if an older search had the same name.
        rid = self.t.client.create_run(self.t.experiment_id, run_name=name,
                                       tags={k: str(v) for k, v in tags.items()}).info.run_id
        self.t.log_params(rid, params)
        return rid

    def child(self, parent_id: str | None, name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
              finish: bool = True) -> str:
        rid = self.t.start_child(parent_id, name, params, tags)
        if metrics:
            self.log_metrics(rid, metrics)
        if finish:
            self.t.end_run(rid, "FINISHED")
        return rid

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        if run_id is not None:
            self.t.log_epoch_metrics(run_id, _numeric(metrics), int(step))

    def log_artifacts(self, run_id: str | None, paths: Iterable[str | Path]) -> None:
        if run_id is not None:
            for p in paths:
                self.t.log_artifact(run_id, p)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if run_id is not None:
            self.t.log_params(run_id, params)

    def tag(self, run_id: str | None, key: str, value: str) -> None:
        if run_id is not None:
            self.t.set_tags(run_id, {key: value})

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.t.end_run(run_id, status)


def make_tracker(uri: str | None, experiment: str, out: str | Path, enabled: bool = True) -> Tracker:
    """`uri`, else $MLFLOW_TRACKING_URI, else sqlite in OUT; the no-op tracker when disabled."""
    if not enabled:
        return Tracker()
    from ecgsearch.distributed.mlflow_log import TrackingError, tracking_uri_for

    try:
        resolved = tracking_uri_for(out, uri)
    except TrackingError as exc:
        raise ValueError(str(exc)) from None
    return MlflowTracker(resolved, experiment)

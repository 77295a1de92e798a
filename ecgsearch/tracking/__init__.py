"""MLflow tracking for every command (tune, rle, subsets): one API, one tag vocabulary, and no
MLflow call on the critical path.

Layout
------
store.py    URI rules, `preflight`, `Store` (the only code that calls an MlflowClient)
writer.py   `Writer`: one background thread per tracker, a FIFO of calls, bounded HTTP
            retries, offline detection, replay, the backlog file
tracker.py  `Tracker` (what callers use) and `NullTracker` (tracking disabled)

API
---
tracking_uri_for(uri=None, root=None) -> str   `uri`, else $MLFLOW_TRACKING_URI, else
                                          sqlite:///<working directory>/mlflow.db (one store)
preflight(uri)                            TrackingError naming the store and the fix, fast
make_tracker(uri, experiment, out, enabled=True) -> Tracker | NullTracker   (preflight first)
Tracker(uri, experiment, out)
    .parent(name, params, tags, run_id=None) -> run id   a NEW top-level run (waits, bounded),
                                          or, with run_id, the caller's own run reopened (resume)
    .child(parent, name, params, tags, metrics, finish=True) -> Run handle (at once)
    .log_params / .log_config / .log_metrics(run, metrics, step) / .tag / .tags
    .log_artifact(run, path, artifact_path, move=False) / .log_artifacts / .log_dict
    .end(run, status, error=None)         FINISHED | FAILED | KILLED; error -> `error` tag + error.txt
    .run_id(handle or name, parent, wait_s) / .register_model(...)   answers, bounded waits
    .flush(timeout_s) / .close(wait_s) -> Report (what is still unlogged; OUT/tracking_backlog.json)
    .uri / .experiment / .enabled
live(out) -> the open Tracker of that folder in this process (for Tune's unpickled callbacks)

Tags (one vocabulary): kind (train | study | trial | search | step | candidate | baseline | subset |
reconstruction), task, model, study or search (the parent's name), leads, n_leads; trial_id, error,
resumed.
Children inherit task/model/study/search from their parent. Experiments carry
mlflow.experimentKind=custom_model_development so MLflow 3 opens them as training runs.
"""
from __future__ import annotations

from pathlib import Path

from ecgsearch.tracking.store import (EXPERIMENT_KIND, HTTP_BOUNDS, TrackingError, flatten, preflight, run_name,
                                      tracking_uri_for)
from ecgsearch.tracking.tracker import BACKLOG_FILE, NullTracker, Report, Tracker, live, root_cause
from ecgsearch.tracking.writer import Run

__all__ = ["BACKLOG_FILE", "EXPERIMENT_KIND", "HTTP_BOUNDS", "NullTracker", "Report", "Run", "Tracker",
           "TrackingError", "flatten", "live", "make_tracker", "preflight", "root_cause", "run_name",
           "tracking_uri_for"]


def make_tracker(uri: str | None, experiment: str, out: str | Path, enabled: bool = True) -> NullTracker:
    """`uri`, else $MLFLOW_TRACKING_URI, else the working directory's mlflow.db; the no-op tracker
    when disabled. OUT holds the tracker's backlog and spool, not the store.
    A store that does not answer fails here, before any training."""
    if not enabled:
        return NullTracker()
    resolved = tracking_uri_for(uri)
    preflight(resolved)
    return Tracker(resolved, experiment, out)

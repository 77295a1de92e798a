"""`ecgsearch.tracking` on a real sqlite store: URI rules, preflight, runs that end in their true
status, resume by saved parent id (never by name), one tag vocabulary, artifacts next to the
database, an idempotent registry. (A real `mlflow server` that dies: test_tracking_server.py.)"""
from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ecgsearch.tracking import (EXPERIMENT_KIND, NullTracker, Tracker, TrackingError, make_tracker, preflight,
                                run_name, tracking_uri_for)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlflow")
    uri = tracking_uri_for(root=out)
    preflight(uri)          # creates the database
    return out, uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed(t: Tracker):
    report = t.close()
    assert report.problems == 0, report
    return MlflowClient(t.uri)


def test_tracking_uri_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # One store per working directory, whatever the command's --out
    assert tracking_uri_for() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri_for(root=tmp_path / "x") == f"sqlite:///{(tmp_path / 'x').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri_for() == "http://127.0.0.1:5999"
    assert tracking_uri_for("sqlite:////x/y.db") == "sqlite:////x/y.db"   # the flag wins
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(TrackingError, match="file store"):
            tracking_uri_for(bad)


def test_preflight_fails_fast_and_names_the_store(tmp_path):
    port = _free_port()   # nothing listens here
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port} does not answer"):
        preflight(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(TrackingError, match="folder .*missing does not exist"):
        preflight(f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(ValueError, match="does not answer"):   # what the CLI reports as a bad setting
        make_tracker(f"http://127.0.0.1:{port}", "x", tmp_path)

    class Unhealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a server that answers, but not healthily
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(TrackingError, match=r"answered HTTP 503 \(Service Unavailable\)"):
            preflight(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()


def test_runs_end_in_their_true_status_with_the_error(store, tmp_path):
    _, uri = store
    t = Tracker(uri, "lifecycle", tmp_path)
    parent = t.parent("study-a", params={"model": "resnet1d_tiny"},
                      tags={"kind": "study", "study": "study-a", "task": "rhythm", "model": "resnet1d_tiny"})
    ok = t.child(parent, run_name("study-a", "ok"), tags={"kind": "trial"}, finish=False)
    t.log_metrics(ok, {"score": 0.5, "device": "cpu", "flag": True, "undefined": float("nan")}, step=1)
    t.log_metrics(ok, {"score": 0.7}, step=2)
    t.end(ok)
    try:
        raise RuntimeError("boom: the data loader died")
    except RuntimeError as exc:
        bad = t.child(parent, run_name("study-a", "bad"), tags={"kind": "trial"}, finish=False)
        t.end(bad, "FAILED", error=exc)
    stopped = t.child(parent, run_name("study-a", "stopped"), finish=False)
    t.end(stopped, "KILLED", error="Traceback ...\nKeyboardInterrupt")
    with pytest.raises(ValueError, match="run status 'DONE'"):
        t.end(ok, "DONE")
    t.end(parent)
    assert t.run_id(ok) is not None and t.run_id("study-a/ok", parent) == t.run_id(ok)
    c = _closed(t)
    assert not (tmp_path / "tracking_backlog.json").exists()
    status = {r.info.run_name: r.info.status
              for r in c.search_runs([c.get_experiment_by_name("lifecycle").experiment_id],
                                     filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert status == {"study-a/ok": "FINISHED", "study-a/bad": "FAILED", "study-a/stopped": "KILLED"}
    assert c.get_run(parent).info.status == "FINISHED"
    assert [(m.step, m.value) for m in c.get_metric_history(ok.id, "score")] == [(1, 0.5), (2, 0.7)]
    # Strings, booleans and NaN are not metrics: skipped, not coerced.
    assert set(c.get_run(ok.id).data.metrics) == {"score"}
    failed = c.get_run(bad.id)
    assert failed.data.tags["error"] == "RuntimeError: boom: the data loader died"
    text = Path(c.download_artifacts(bad.id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "boom: the data loader died" in text
    assert c.get_run(stopped.id).data.tags["error"] == "KeyboardInterrupt"
    # Children inherit the parent's scope tags (task, model, study) and keep their own kind.
    tags = c.get_run(ok.id).data.tags
    assert (tags["kind"], tags["study"], tags["task"], tags["model"]) == ("trial", "study-a", "rhythm",
                                                                        "resnet1d_tiny")


def test_a_new_parent_never_takes_over_an_old_one_and_resume_reopens_by_saved_id(store, tmp_path):
    _, uri = store
    t = Tracker(uri, "resume", tmp_path / "a")
    first = t.parent("study-b", tags={"kind": "study"})
    child = t.child(first, "study-b/trial-1", params={"lr": 0.01}, finish=False)
    t.close()    # a driver that dies leaves both RUNNING
    # Another study of the same name on the same server: a run of its own.
    other = Tracker(uri, "resume", tmp_path / "b")
    second = other.parent("study-b", tags={"kind": "study"})
    assert second != first
    other.close()
    # --resume of the first study: its saved parent is reopened, stale children closed, and a
    # child of the same name found again instead of duplicated.
    t2 = Tracker(uri, "resume", tmp_path / "a")
    assert t2.parent("study-b", run_id=first) == first
    again = t2.child(first, "study-b/trial-1", params={"lr": 0.01}, finish=False)
    fresh = t2.child(first, "study-b/trial-2", finish=False)
    t2.end(again)
    t2.end(fresh)
    t2.end(first)
    c = _closed(t2)
    assert again.id == child.id and fresh.id != child.id
    t2.log_metrics(again, {"late": 1.0})   # after close: reported, never raised into the caller's work
    run = c.get_run(child.id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert c.get_run(second).info.status == "RUNNING"     # the other study's run was never touched
    with pytest.raises(ValueError, match="free of quotes"):
        run_name("it's")


def test_experiment_kind_params_artifacts_next_to_the_db_and_idempotent_registry(store, tmp_path):
    out, uri = store
    c = MlflowClient(uri)
    old = c.create_experiment("older", artifact_location=(out / "mlartifacts").as_uri())   # made before the tag
    t = Tracker(uri, "older", tmp_path)
    cfg = {"model": "mlresnet_tiny", "leads": ["I", "II"], "model_kwargs": {"dropout": 0.25, "filters": [8, 16]},
           "loss": {}}
    parent = t.parent("study-c")
    t.log_config(parent, cfg)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    t.log_artifact(parent, ckpt, "best")
    handed = tmp_path / "gone" / "model.ckpt"
    handed.parent.mkdir()
    handed.write_bytes(b"child weights")
    run = t.child(parent, "study-c/trial-1", finish=False)
    t.log_artifact(run, handed, "checkpoint", move=True)
    assert not handed.exists()                       # handed over: the caller may delete its folder
    v1 = t.register_model(parent, "best", "ecgsearch-test-model", tags={"score": 0.9, "trial_id": "a"})
    again = t.register_model(parent, "best", "ecgsearch-test-model", tags={"score": 0.9, "trial_id": "a"})
    v2 = t.register_model(parent, "best", "ecgsearch-test-model", tags={"trial_id": "b"})
    t.end(run)
    t.end(parent)
    c = _closed(t)
    key, value = EXPERIMENT_KIND
    assert c.get_experiment(old).tags[key] == value
    params = c.get_run(parent).data.params
    assert params["cfg.model_kwargs.dropout"] == "0.25" and params["cfg.leads"] == '["I", "II"]'
    assert params["cfg.model_kwargs.filters"] == "[8, 16]" and params["cfg.loss"] == "{}"
    art = Path(c.get_run(parent).info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(out / "mlartifacts"), art   # not ./mlruns of the working directory
    assert json.loads((art / "config.json").read_text()) == cfg and (art / "best" / "model.ckpt").read_bytes() == b"weights"
    child_art = Path(c.get_run(run.id).info.artifact_uri.removeprefix("file://"))
    assert (child_art / "checkpoint" / "model.ckpt").read_bytes() == b"child weights"
    assert not (tmp_path / "tracking_spool").exists()
    assert (v1, again, v2) == ("1", "1", "2")          # a replayed registration adds no version
    mv = c.get_model_version("ecgsearch-test-model", "1")
    assert mv.run_id == parent and mv.source.endswith("/best") and mv.tags["score"] == "0.9"
    with pytest.raises(ValueError, match="limit is 6000"):
        t.log_params(parent, {"huge": "x" * 7000})
    new = Tracker(uri, "brand-new", tmp_path / "n")
    new.parent("p")
    assert _closed(new).get_experiment_by_name("brand-new").tags[key] == value


def test_null_tracker_accepts_everything(tmp_path):
    t = make_tracker(None, "x", tmp_path, enabled=False)
    assert isinstance(t, NullTracker) and not t.enabled and t.uri is None
    parent = t.parent("p", {"a": 1}, {"kind": "search"})
    run = t.child(parent, "c", {"leads": "I"}, {"kind": "candidate"}, {"score": 1.0})
    t.log_metrics(run, {"x": 1.0})
    t.log_artifacts(parent, [tmp_path / "missing"])
    t.tag(run, "k", "v")
    t.end(run, "FAILED", error="x")
    assert t.close().problems == 0 and not (tmp_path / "mlflow.db").exists()

"""MLflow helpers on a real sqlite store: URI rules, preflight, run lifecycle, resume by name, registry."""
from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from ecgsearch.distributed.mlflow_log import Tracker, TrackingError, preflight, run_name, tracking_uri_for


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlflow")
    uri = tracking_uri_for(out)
    preflight(uri)          # creates the database
    return out, uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_uri_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_for(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri_for(tmp_path) == "http://127.0.0.1:5999"
    assert tracking_uri_for(tmp_path, "sqlite:////x/y.db") == "sqlite:////x/y.db"   # the flag wins
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(TrackingError, match="file store"):
            tracking_uri_for(tmp_path, bad)


def test_preflight_fails_fast_and_names_the_store(tmp_path):
    port = _free_port()   # nothing listens here
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port} does not answer"):
        preflight(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(TrackingError, match="folder .*missing does not exist"):
        preflight(f"sqlite:///{tmp_path}/missing/mlflow.db")

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


def test_runs_always_end_with_the_right_status(store):
    _, uri = store
    t = Tracker(uri, "lifecycle")
    with t.parent_run("study-a", params={"model": "resnet1d_tiny"}) as parent:
        with t.child_run(parent, run_name("study-a", "ok")) as ok:
            t.log_epoch_metrics(ok, {"score": 0.5, "device": "cpu", "flag": True}, epoch=1)
            t.log_epoch_metrics(ok, {"score": 0.7}, epoch=2)
        with pytest.raises(RuntimeError, match="boom"):
            with t.child_run(parent, run_name("study-a", "bad")):
                raise RuntimeError("boom")
        with pytest.raises(KeyboardInterrupt):
            with t.child_run(parent, run_name("study-a", "stopped")):
                raise KeyboardInterrupt
    status = {r.info.run_name: r.info.status for r in t.children(parent)}
    assert status == {"study-a/ok": "FINISHED", "study-a/bad": "FAILED", "study-a/stopped": "KILLED"}
    assert t.client.get_run(parent).info.status == "FINISHED"
    hist = t.client.get_metric_history(ok, "score")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.7)]
    # Strings and booleans are not metrics: they were skipped, not coerced.
    assert set(t.client.get_run(ok).data.metrics) == {"score"}


def test_resume_finds_runs_by_name_and_closes_stale_children(store):
    _, uri = store
    t = Tracker(uri, "resume")
    parent = t.start_parent("study-b", tags={"ecgsearch.kind": "study"})
    child = t.start_child(parent, "study-b/trial-1", params={"lr": 0.01})
    # A driver that dies leaves both RUNNING; a new Tracker (new process) must find the same runs.
    t2 = Tracker(uri, "resume")
    assert t2.experiment_id == t.experiment_id
    assert t2.start_parent("study-b") == parent
    assert t2.start_child(parent, "study-b/trial-1", params={"lr": 0.01}) == child
    assert t2.client.get_run(child).data.tags["ecgsearch.resumed"] == "1"
    # A child and a parent of the same name are different runs.
    assert t2.find_run("study-b", top_level=True).info.run_id == parent
    assert t2.close_stale_children(parent) == [child]
    assert t2.client.get_run(child).info.status == "KILLED"
    t2.end_run(parent, "FINISHED")
    with pytest.raises(ValueError, match="run status 'DONE'"):
        t2.end_run(parent, "DONE")
    with pytest.raises(ValueError, match="free of quotes"):
        run_name("it's")


def test_config_params_artifacts_next_to_the_db_and_registry(store, tmp_path):
    out, uri = store
    t = Tracker(uri, "config")
    cfg = {"model": "mlresnet_tiny", "leads": ["I", "II"], "model_kwargs": {"dropout": 0.25, "filters": [8, 16]},
           "loss": {}}
    with t.parent_run("study-c") as parent:
        t.log_config(parent, cfg)
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_bytes(b"weights")
        t.log_artifact(parent, ckpt, "best")
        v1 = t.register_model(parent, "best", "ecgsearch-test-model", tags={"score": 0.9})
        v2 = t.register_model(parent, "best", "ecgsearch-test-model")
    params = t.client.get_run(parent).data.params
    assert params["cfg.model_kwargs.dropout"] == "0.25" and params["cfg.leads"] == '["I", "II"]'
    assert params["cfg.model_kwargs.filters"] == "[8, 16]" and params["cfg.loss"] == "{}"
    art = Path(t.client.get_run(parent).info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(out / "mlartifacts"), art   # not ./mlruns of the working directory
    assert (art / "config.json").exists() and (art / "best" / "model.ckpt").read_bytes() == b"weights"
    assert (v1, v2) == ("1", "2")
    mv = t.client.get_model_version("ecgsearch-test-model", "1")
    assert mv.run_id == parent and mv.source.endswith("/best") and mv.tags["score"] == "0.9"
    with pytest.raises(ValueError, match="limit is 6000"):
        t.log_params(parent, {"huge": "x" * 7000})

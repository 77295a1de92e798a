"""Tracking against a real `mlflow server` that dies (SIGKILL) and comes back on the same store.

The writer must keep MLflow off the critical path: with the server dead, queued calls cost the
caller nothing, `close()` costs seconds, what was missed is listed in OUT/tracking_backlog.json,
and it is replayed (in order, runs ending in their true status) when the server answers again:
within the session, or by the next tracker on the same folder (`--resume`).

Before this writer, every call ran on Tune's event loop with MLflow's default retries: one call
to a dead server took ~246 s (measured: 7 retries, backoff factor 2), and a 4-trial study that
took ~2 minutes had not finished 16 minutes after its server was killed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray_fixtures import ray_session  # noqa: F401
from servers import MlflowServer

from ecgsearch.tracking import BACKLOG_FILE, Tracker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.kill()


def _log_a_study(t: Tracker, name: str):
    parent = t.parent(name, params={"trials": 2}, tags={"kind": "study", "study": name})
    ok = t.child(parent, f"{name}/trial-1", params={"lr": 0.01}, tags={"kind": "trial"}, finish=False)
    for epoch in (1, 2):
        t.log_metrics(ok, {"score": 0.5 + epoch / 10}, step=epoch)
    return parent, ok


def test_dead_server_costs_seconds_then_the_backlog_is_replayed_by_the_next_session(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    t = Tracker(server.uri, "dies", out, retry_s=2)
    parent, ok = _log_a_study(t, "study-dead")
    assert t.flush(60)                     # the server was alive so far: all of it is written
    server.kill()
    started = time.monotonic()
    t.end(ok)
    bad = t.child(parent, "study-dead/trial-2", params={"lr": 0.1}, tags={"kind": "trial"}, finish=False)
    t.log_metrics(bad, {"score": 0.1}, step=1)
    ckpt = tmp_path / "tmpdir" / "model.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    t.log_artifact(ok, ckpt, "checkpoint", move=True)
    t.end(bad, "FAILED", error="Traceback ...\nValueError: loss is NaN")
    t.end(parent, "FINISHED")
    queued = time.monotonic() - started
    report = t.close(wait_s=60)
    closed = time.monotonic() - started
    # Queueing is instant; close notices the dead server with one probe instead of draining.
    assert queued < 2.0 and closed < 30.0, (queued, closed)
    assert report.backlog == out / BACKLOG_FILE and len(report.pending) >= 6 and not report.rejected
    doc = json.loads((out / BACKLOG_FILE).read_text())
    runs = {r["name"]: r for r in doc["runs"].values()}
    assert runs["study-dead/trial-1"]["id"] == ok.id                 # created before the kill
    assert runs["study-dead/trial-2"]["id"] is None                  # a placeholder, created on replay
    assert [c["call"] for c in doc["calls"]][:2] == ["end", "create"]  # in the order they were made
    assert (out / "tracking_spool").is_dir()                         # the handed-over file waits there

    server.start()
    t2 = Tracker(server.uri, "dies", out)   # what `--resume` in this folder does first
    assert t2.close(wait_s=60).problems == 0
    assert not (out / BACKLOG_FILE).exists() and not (out / "tracking_spool").exists()
    c = MlflowClient(server.uri)
    children = {r.info.run_name: r for r in c.search_runs(
        [c.get_experiment_by_name("dies").experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert {n: r.info.status for n, r in children.items()} == {"study-dead/trial-1": "FINISHED",
                                                               "study-dead/trial-2": "FAILED"}
    assert children["study-dead/trial-2"].data.tags["error"] == "ValueError: loss is NaN"
    assert children["study-dead/trial-2"].data.params["lr"] == "0.1"
    assert [m.value for m in c.get_metric_history(ok.id, "score")] == pytest.approx([0.6, 0.7])
    assert {a.path for a in c.list_artifacts(ok.id, "checkpoint")} == {"checkpoint/model.ckpt"}
    assert c.get_run(parent).info.status == "FINISHED"


def test_a_server_that_comes_back_within_the_session_gets_everything_in_order(server, tmp_path):
    t = Tracker(server.uri, "returns", tmp_path, retry_s=1)
    parent, ok = _log_a_study(t, "study-back")
    assert t.flush(60)
    server.kill()
    for epoch in (3, 4, 5):
        t.log_metrics(ok, {"score": epoch / 10}, step=epoch)
    t.end(ok)
    late = t.child(parent, "study-back/trial-2", tags={"kind": "trial"}, metrics={"score": 0.9})
    t.end(parent)
    deadline = time.monotonic() + 60
    while not t.writer.offline and time.monotonic() < deadline:   # it noticed, and went on
        time.sleep(0.1)
    assert t.writer.offline
    server.start()
    assert t.close(wait_s=90).problems == 0 and not (tmp_path / BACKLOG_FILE).exists()
    c = MlflowClient(server.uri)
    assert [m.step for m in c.get_metric_history(ok.id, "score")] == [1, 2, 3, 4, 5]
    assert c.get_run(ok.id).info.status == "FINISHED" and c.get_run(late.id).info.status == "FINISHED"
    assert c.get_run(late.id).data.metrics["score"] == 0.9 and c.get_run(parent).info.status == "FINISHED"


# -- a real `ecgsearch tune` study whose server dies mid-study --------------------------------
TRIALS, EPOCHS = 3, 1
SPACE = {"format": "ecgsearch.search_space/1", "name": "tiny-test", "version": 1, "models": ["resnet1d_tiny"],
         "params": {"lr": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
                    "model_kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}}
STUDY = "shared-name"   # both studies: a new study must not take over the older one's parent run


def _tune(cache, out: Path, space: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ecgsearch", "tune", "--data", str(cache), "--model", "resnet1d_tiny",
            "--task", "rhythm", "--trials", str(TRIALS), "--epochs", str(EPOCHS), "--search-space", str(space),
            "--out", str(out), "--max-concurrent", "2", "--tracking-uri", uri, "--study-name", STUDY,
            "--set", "precision=fp32", "--set", "bootstrap=0", "--set", "threads=1", *extra]


def _events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _run_study(cmd: list[str], log: Path, env: dict, on_first_complete=None) -> dict:
    """Run a driver to the end; `on_first_complete()` is called once the first trial completed."""
    out = Path(cmd[cmd.index("--out") + 1])
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    fired = None
    while proc.poll() is None:
        if time.monotonic() - started > 900:
            proc.kill()
            pytest.fail(f"study stalled:\n{log.read_text()[-4000:]}")
        if on_first_complete and fired is None and any(e["event"] == "complete" for e in _events(out)):
            on_first_complete()
            fired = time.monotonic()
        time.sleep(0.2)
    ended = time.monotonic()
    return {"rc": proc.returncode, "wall": ended - started, "after_event": ended - fired if fired else None,
            "log": log.read_text(), "out": out}


@pytest.fixture(scope="module")
def studies(ray_session, synth_cache, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("dying-server")
    space = root / "space.json"
    space.write_text(json.dumps(SPACE))
    server = MlflowServer(root)
    server.start()
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    try:
        dead = _run_study(_tune(synth_cache, root / "dead", space, server.uri), root / "dead.log", env,
                          on_first_complete=server.kill)
        assert dead["rc"] == 0, dead["log"][-4000:]
        backlog = json.loads((root / "dead" / BACKLOG_FILE).read_text())
        dead["best"] = json.loads((root / "dead" / "best.json").read_text())   # before the resume
        server.start()                      # the same store, the same port: the study's tracking URI
        resumed = _run_study(_tune(synth_cache, root / "dead", space, server.uri, "--resume"),
                             root / "resumed.log", env)
        assert resumed["rc"] == 0, resumed["log"][-4000:]
        failing = root / "no-data"          # exists, so the driver accepts it; every trial fails to load it
        failing.mkdir()
        failed = _run_study(_tune(failing, root / "failed", space, server.uri, "--trials", "1",
                                  "--max-failures", "0"), root / "failed.log", env)
        print(f"\nstall figures: server killed after the first trial: study {dead['wall']:.0f} s "
              f"({dead['after_event']:.0f} s from kill to exit); resume that replayed the backlog: "
              f"{resumed['wall']:.0f} s")
        yield {"dead": dead, "backlog": backlog, "resumed": resumed, "failed": failed,
               "uri": server.uri, "root": root}
    finally:
        server.kill()


@pytest.mark.ray
@pytest.mark.slow
def test_a_dead_server_costs_the_study_seconds_not_minutes(studies):
    dead = studies["dead"]
    done = [e["trial"] for e in _events(dead["out"]) if e["event"] == "complete"]
    assert len(set(done)) == TRIALS and (dead["out"] / "best.json").is_file() and (dead["out"] / "best.ckpt").is_file()
    # From the kill to the driver's exit: the remaining trials' training plus a bounded close (a
    # live-server study of this size takes ~2 minutes in all); before the writer, > 16 minutes.
    assert dead["after_event"] < 150, dead["after_event"]
    assert "does not answer" in dead["log"] and "--resume" in dead["log"]   # said once, with the fix
    best = dead["best"]
    assert best["mlflow"]["version"] is None    # the registry did not answer: queued, not faked
    # The backlog names the runs still to be created (no id yet) or ended, and each call, in order,
    # ending with the parent's: the registration, the best trial's tags, its end.
    backlog = studies["backlog"]
    runs = backlog["runs"].values()
    assert any(r["id"] is None for r in runs) and all(r["name"].startswith(f"{STUDY}/trial-") for r in runs)
    calls = [(c["call"], c["run"]) for c in backlog["calls"]]
    assert ("register_model", best["mlflow"]["parent_run_id"]) in calls
    assert calls[-1] == ("end", best["mlflow"]["parent_run_id"]) and backlog["rejected"] == []


@pytest.mark.ray
@pytest.mark.slow
def test_resume_replays_the_backlog_and_runs_end_in_their_true_status(studies):
    out = studies["dead"]["out"]
    assert not (out / BACKLOG_FILE).exists() and "replaying" in studies["resumed"]["log"]
    best = json.loads((out / "best.json").read_text())
    c = MlflowClient(studies["uri"])
    exp = c.get_experiment_by_name("ecgsearch-rhythm")
    # Two studies of one name on one server (dead, failed): two parent runs, none reused.
    parents = {p.info.run_id for p in c.search_runs([exp.experiment_id],
                                                     filter_string=f"attributes.run_name = '{STUDY}'")}
    failed = json.loads((studies["failed"]["out"] / "study.json").read_text())["mlflow_parent"]
    assert parents == {best["mlflow"]["parent_run_id"], failed}
    parent = c.get_run(best["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "study"
    assert json.loads((out / "study.json").read_text())["mlflow_parent"] == parent.info.run_id
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == TRIALS and {r.info.status for r in children} == {"FINISHED"}
    for r in children:
        assert (r.data.tags["kind"], r.data.tags["study"], r.data.tags["model"]) == ("trial", STUDY, "resnet1d_tiny")
        assert r.data.tags["n_leads"] == "12" and "lr" in r.data.params and "score" in r.data.metrics
        assert {a.path for a in c.list_artifacts(r.info.run_id, "checkpoint")} == {"checkpoint/model.ckpt"}
    assert best["mlflow"]["run_id"] in {r.info.run_id for r in children}
    mv = c.get_model_version(best["mlflow"]["registered_model"], best["mlflow"]["version"])
    assert mv.run_id == parent.info.run_id
    assert len(c.search_model_versions(f"run_id = '{parent.info.run_id}'")) == 1   # replayed once, not twice
    assert c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") == []
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_trial_is_a_failed_run_with_its_error(studies):
    failed = studies["failed"]
    assert failed["rc"] == 2 and "no trial of study" in failed["log"], failed["log"][-3000:]
    c = MlflowClient(studies["uri"])
    exp = c.get_experiment_by_name("ecgsearch-rhythm")
    study = json.loads((failed["out"] / "study.json").read_text())
    parent = c.get_run(study["mlflow_parent"])
    assert parent.info.status == "FAILED" and "no trial of study" in parent.data.tags["error"]
    trials = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 1 and trials[0].info.status == "FAILED"
    assert trials[0].data.tags["error"] and trials[0].data.tags["kind"] == "trial"
    assert {a.path for a in c.list_artifacts(trials[0].info.run_id)} >= {"error.txt", "config.json"}

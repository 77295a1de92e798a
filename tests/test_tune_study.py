"""A real study: `ecgsearch tune` (OptunaSearch + ASHA, 4 trials x 2 epochs) killed mid-study and
resumed, then checked in MLflow, on disk and against its own best checkpoint; and what a study
prints: our progress and summary lines, Ray's output only in OUT/ray.log unless --verbose."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_fixtures import ray_session  # noqa: F401

from ecgsearch.cli import main as cli_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRIALS, EPOCHS = 4, 2
SPACE = {"format": "ecgsearch.search_space/1", "name": "tiny-test", "version": 1, "models": ["resnet1d_tiny"],
         "params": {"lr": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
                    "model_kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
                    "model_kwargs.filters": {"type": "choice", "options": {"x1": [16, 24, 32, 48],
                                                                           "narrow": [8, 16, 16, 24]}}}}


def _args(cache, out, space, *extra):
    return ["tune", "--data", str(cache), "--model", "resnet1d_tiny", "--task", "rhythm", "--trials", str(TRIALS),
            "--epochs", str(EPOCHS), "--search-space", str(space), "--out", str(out), "--max-concurrent", "2",
            "--set", "precision=fp32", "--set", "bootstrap=0", "--set", "threads=1", *extra]


def _events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _terminated_in_tune_state(exp_dir: Path) -> set[str]:
    """Trials Tune's own saved experiment state records as finished (what --resume will skip)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(str(exp_dir)).trials if t.status == "TERMINATED"}
    except Exception:  # state file not written yet, or being replaced
        return set()


@pytest.fixture(scope="module")
def study(ray_session, synth_cache, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("study")
    out, space = root / "out", root / "space.json"
    space.write_text(json.dumps(SPACE))
    # Join the session's Ray through RAY_ADDRESS, as a `ray job submit` entry point would.
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    cmd = [sys.executable, "-m", "ecgsearch", *_args(synth_cache, out, space)]
    with open(root / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        exp_dir = out / "ray" / f"resnet1d_tiny-rhythm-{out.name}"
        deadline = time.monotonic() + 300
        while True:
            done = {e["trial"] for e in _events(out) if e["event"] == "complete"}
            if len(done) >= 2 and done <= _terminated_in_tune_state(exp_dir):
                break
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                pytest.fail(f"first driver ended or stalled before 2 trials finished:\n"
                            f"{(root / 'first.log').read_text()[-4000:]}")
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)        # the driver dies mid-study, without cleanup
        first.wait()
    killed_pid = first.pid
    with open(root / "resume.log", "w") as log:
        second = subprocess.run(cmd + ["--resume"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=400)
    assert second.returncode == 0, (root / "resume.log").read_text()[-4000:]
    return {"out": out, "space": space, "cache": synth_cache, "killed_pid": killed_pid,
            "finished_before_kill": done, "log": (root / "resume.log").read_text()}


def test_resume_does_not_rerun_finished_trials(study):
    events = _events(study["out"])
    first = {e["trial"] for e in events if e["pid"] == study["killed_pid"] and e["event"] == "start"}
    started_again = {e["trial"] for e in events if e["pid"] != study["killed_pid"] and e["event"] == "start"}
    completes = [e["trial"] for e in events if e["event"] == "complete"]
    assert len(study["finished_before_kill"]) >= 2
    assert not (started_again & study["finished_before_kill"])      # finished trials were kept
    assert len(set(completes)) == len(completes) == TRIALS           # every trial completed exactly once
    assert first | started_again == set(completes)
    # The study's answer is the best of all four trials, whichever session ran them.
    best = json.loads((study["out"] / "best.json").read_text())
    scores = {e["trial"]: e["best_score"] for e in events if e["event"] == "complete"}
    assert best["trial_id"] == max(scores, key=lambda t: scores[t])
    assert best["score"] == pytest.approx(scores[best["trial_id"]], rel=1e-9)


def test_mlflow_holds_parent_and_child_runs_with_params_metrics_and_registry(study):
    from mlflow import MlflowClient

    best = json.loads((study["out"] / "best.json").read_text())
    # The default store: mlflow.db in the driver's working directory, not in --out
    assert best["mlflow"]["tracking_uri"] == f"sqlite:///{study['out'].parent.resolve()}/mlflow.db"
    c = MlflowClient(best["mlflow"]["tracking_uri"])
    exp = c.get_experiment_by_name("ecgsearch-rhythm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = c.get_run(best["mlflow"]["parent_run_id"])
    assert parent.info.run_name == f"resnet1d_tiny-rhythm-{study['out'].name}"
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == str(TRIALS)
    assert parent.data.params["search_space"] == "tiny-test@v1"
    assert parent.data.metrics["best_score"] == pytest.approx(best["score"])
    assert (parent.data.tags["kind"], parent.data.tags["task"], parent.data.tags["n_leads"]) == ("study", "rhythm", "12")
    # The resumed driver reopened the parent the first one saved, instead of looking one up by name.
    assert json.loads((study["out"] / "study.json").read_text())["mlflow_parent"] == parent.info.run_id
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == TRIALS and {ch.info.status for ch in children} == {"FINISHED"}
    for child in children:
        p = child.data.params
        assert {"lr", "model_kwargs.dropout", "model_kwargs.filters"} <= set(p)
        assert p["cfg.model"] == "resnet1d_tiny" and p["cfg.task"] == "rhythm" and p["cfg.precision"] == "fp32"
        assert child.data.tags["system.device"] == "cpu" and child.data.tags["system.world_size"] == "1"
        assert (child.data.tags["kind"], child.data.tags["study"]) == ("trial", parent.info.run_name)
        hist = c.get_metric_history(child.info.run_id, "score")
        assert [m.step for m in hist] == list(range(1, len(hist) + 1)) and 1 <= len(hist) <= EPOCHS
        art = Path(child.info.artifact_uri.removeprefix("file://"))
        assert (art / "checkpoint" / "model.ckpt").is_file() and (art / "config.json").is_file()
    best_child = next(ch for ch in children if ch.data.tags["trial_id"] == best["trial_id"])
    assert best_child.info.run_id == best["mlflow"]["run_id"]
    assert float(best_child.data.tags["best_score"]) == pytest.approx(best["score"])
    mv = c.get_model_version(best["mlflow"]["registered_model"], best["mlflow"]["version"])
    assert mv.run_id == parent.info.run_id and mv.tags["study"] == parent.info.run_name
    # The interrupted session's runs were resumed and finished, never left RUNNING.
    running = c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert running == []
    assert not (study["out"] / "tracking_backlog.json").exists()


def test_best_checkpoint_reproduces_its_logged_validation_metric(study):
    from ecgsearch.engine import TrainConfig, evaluate, load_checkpoint

    best = json.loads((study["out"] / "best.json").read_text())
    assert best["metric"] == "macro_auprc" and best["mode"] == "max" and math.isfinite(best["score"])
    cfg = TrainConfig.from_file(study["out"] / "best.json")      # what `ecgsearch train --config` reads
    ck = load_checkpoint(study["out"] / "best.ckpt")
    assert ck.cfg == cfg and ck.epoch == best["epoch"]
    assert cfg.model_kwargs["filters"] == SPACE["params"]["model_kwargs.filters"]["options"][
        best["sampled"]["model_kwargs.filters"]]
    assert best["params"]["model_kwargs.filters"] == cfg.model_kwargs["filters"]
    val = evaluate(study["out"] / "best.ckpt", study["cache"], "val", bootstrap=0)
    assert val["macro_auprc"] == pytest.approx(best["score"], rel=1e-5)


def test_the_champion_loads_from_the_registry_and_predicts_what_ecgsearch_predict_prints(study, synth_root,
                                                                                       capsys, monkeypatch):
    import mlflow
    import numpy as np
    import pandas as pd
    import wfdb

    from ecgsearch.leads import LEADS

    best = json.loads((study["out"] / "best.json").read_text())
    uri = best["mlflow"]["model_uri"]
    assert uri == f"models:/ecgsearch-rhythm-resnet1d_tiny@champion"
    records = pd.read_csv(synth_root / "ptbxl_database.csv")["filename_lr"].head(3).tolist()
    paths = [str(synth_root / r) for r in records]
    assert cli_main(["predict", "--checkpoint", str(study["out"] / "best.ckpt"), *paths, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # (not mlflow.set_tracking_uri: it also sets the variable, for the rest of the session)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", best["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(uri)
    meta = model.metadata.metadata["ecgsearch"]
    assert meta["leads"] == list(LEADS) and meta["fs"] == 100 and meta["units"] == "mV"
    assert len(meta["normaliser"]["mean"]) == 12 and set(meta["outputs"]) == {k for k in printed[0] if k in meta["outputs"]}
    # beside the probabilities: a call per class from the checkpoint's validation thresholds
    assert {f"{n}_call" for n in meta["outputs"]} <= set(printed[0])
    spec = model.metadata.get_input_schema().inputs[0]
    assert spec.shape == (-1, 12, meta["n_samples"]) and spec.type == np.dtype(np.float32)
    # Raw mV from the WFDB files, (n, leads, samples); the 10 s records centred in the model's
    # window with zeros, as training and `ecgsearch predict` place them.
    raw = np.stack([wfdb.rdsamp(p)[0].T for p in paths]).astype(np.float32)
    pad = meta["n_samples"] - raw.shape[2]
    assert raw.shape[1:] == (12, 1000) and pad >= 0
    x = np.pad(raw, ((0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    got = model.predict(x)
    assert got.shape == (3, len(meta["outputs"]))
    for row, pred in zip(printed, got):
        assert [row[name] for name in meta["outputs"]] == pytest.approx(pred.tolist(), rel=1e-5, abs=1e-6)
    with pytest.raises(Exception, match="shape"):
        model.predict(x[:, :6])            # six leads for a 12-lead model: refused, not padded


def test_resume_and_reuse_rules(study, capsys):
    out, space, cache = study["out"], study["space"], study["cache"]
    assert cli_main(_args(cache, out, space)) == 2
    assert "already holds study" in capsys.readouterr().err
    changed = _args(cache, out, space, "--resume")
    changed[changed.index("--trials") + 1] = "6"
    assert cli_main(changed) == 2
    assert "its trials differ" in capsys.readouterr().err
    # Resuming a finished study trains nothing and keeps its answer (and its registry version).
    before, n_events = (out / "best.json").read_text(), len(_events(out))
    assert cli_main(_args(cache, out, space, "--resume")) == 0
    assert json.loads((out / "best.json").read_text()) == json.loads(before)
    assert [e["event"] for e in _events(out)[n_events:]] == []


def test_unreachable_tracking_server_fails_before_training(synth_cache, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]        # closed again: nothing answers there
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "out"
    rc = cli_main(_args(synth_cache, out, space, "--tracking-uri", f"http://127.0.0.1:{port}"))
    err = capsys.readouterr().err
    assert rc == 2 and f"http://127.0.0.1:{port} does not answer" in err
    assert not (out / "ray").exists() and not (out / "train").exists() and not (out / "events.jsonl").exists()


def _console(ray_address: str, argv: list[str], cwd: Path) -> str:
    """A driver process's whole console (stdout + stderr) for `ecgsearch <argv>`, joining the session's Ray."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.run([sys.executable, "-m", "ecgsearch", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_verbose_console_shows_rays_output_beside_our_summary(ray_session, synth_cache, tmp_path):  # noqa: F811
    # The quiet default console is checked on a submitted job's logs (test_ray_jobs.py).
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    verbose = _args(synth_cache, tmp_path / "verbose", space, "--verbose")
    verbose[verbose.index("--trials") + 1], verbose[verbose.index("--epochs") + 1] = "1", "1"
    text = _console(ray_session, verbose, tmp_path)
    # Ray Tune's trial table and trial lines are back (a one-worker trial trains in its Tune actor,
    # so there is no RayTrainWorker output to see)
    assert "Trial status" in text and "Trial _trial_" in text and " completed after 1 iterations" in text
    assert "trial " in text and "best trial " in text                   # and our summary lines stay
    assert "[tune] 1 trials" not in text                                # but no display to break it up
    assert "joined Ray cluster" in (tmp_path / "verbose" / "ray.log").read_text()

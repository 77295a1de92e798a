"""The cluster user's path on loopback: `ray start --head` (127.0.0.1, token auth), one real
`mlflow server` (on a throwaway PostgreSQL, as cluster/k8s/mlflow.yaml runs it), and the job scripts submitted with `ray job submit --runtime-env
cluster/runtime_env.yaml`, stopped with `ray job stop` and resubmitted with `--resume`.

Everything goes through Ray's own CLI, as a user types it; the jobs run the checkout that
`working_dir: .` ships, and log to the server given by `--tracking-uri`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import MlflowServer, Postgres, RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SPACE = {"format": "ecgsearch.search_space/1", "name": "tiny-test", "version": 1, "models": ["resnet1d_tiny"],
         "params": {"lr": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
                    "model_kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}}
FAST = ["--set", "precision=fp32", "--set", "bootstrap=20", "--set", "threads=1"]
TERMINAL = {"succeeded": "SUCCEEDED", "was stopped": "STOPPED", "failed": "FAILED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("loopback")
    try:
        pg, why_not = Postgres(), None
        pg.start()
    except pytest.skip.Exception as exc:   # not installed: the jobs still run, against sqlite
        pg, why_not = None, str(exc)
    server = MlflowServer(root, backend=pg.uri if pg else None)
    server.start()
    head = RayHead(num_cpus=2)
    # Two Ray instances on this node (this session's and the head): pin the state API to the head's
    # dashboard, as runtime_env.yaml advises for such nodes. Set on the node, so the job inherits it.
    head.env["RAY_API_SERVER_ADDRESS"] = head.address
    started = time.monotonic()
    try:
        head.start()
        yield {"root": root, "server": server, "head": head, "head_start_s": time.monotonic() - started,
               "pg": pg, "why_not_pg": why_not}
    finally:
        head.stop()
        server.kill()
        if pg is not None:
            pg.stop()


def _status(head: RayHead, sid: str) -> str:
    out = head.ray("job", "status", sid, "--address", head.address, timeout=60)
    text = out.stdout + out.stderr
    for phrase, status in TERMINAL.items():
        if f"Job '{sid}' {phrase}" in text:
            return status
    m = re.search(rf"Status for job '{re.escape(sid)}': (\w+)", text)
    return m.group(1) if m else f"UNKNOWN ({text.strip()[-300:]})"


def _submit(head: RayHead, sid: str, script: str, args: list[str]) -> None:
    deadline = time.monotonic() + 90
    while True:
        proc = head.ray("job", "submit", "--address", head.address, "--runtime-env", "cluster/runtime_env.yaml",
                        "--submission-id", sid, "--no-wait", "--", "python", script, *args, cwd=REPO, timeout=300)
        # A head just started answers before its job agent is up: Ray says to try again later.
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _wait(head: RayHead, sid: str, timeout_s: float = 600, until=None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _status(head, sid)
        if status in TERMINAL.values():
            return status
        if until is not None and until():
            return status
        time.sleep(2)
    raise AssertionError(f"job {sid} not done after {timeout_s:.0f} s:\n{_logs(head, sid)[-4000:]}")


def _logs(head: RayHead, sid: str) -> str:
    return head.ray("job", "logs", sid, "--address", head.address, timeout=60).stdout


def _console(logs: str) -> str:
    """What the driver printed: `ray job logs` without its own header line and without the preface
    Ray's job manager writes before it starts the entrypoint (up to "Running entrypoint ...")."""
    lines = [ln for ln in logs.splitlines() if "Job submission server address" not in ln]
    starts = [i for i, ln in enumerate(lines) if "Running entrypoint for job" in ln]
    return "\n".join(lines[starts[0] + 1:] if starts else lines)


def _runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=500) if exp else []


def test_the_head_refuses_a_client_without_the_token(cluster):
    head = cluster["head"]
    denied = head.ray("job", "list", "--address", head.address, token=False, timeout=60)
    assert denied.returncode != 0, denied.stdout
    assert head.ray("job", "list", "--address", head.address, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def tune_job(cluster, synth_cache):
    root, head, uri = cluster["root"], cluster["head"], cluster["server"].uri
    space = root / "space.json"
    space.write_text(json.dumps(SPACE))
    out = root / "study"
    started = time.monotonic()
    _submit(head, "tune-e2e", "jobs/tune_job.py",
            ["--data", str(synth_cache), "--model", "resnet1d_tiny", "--task", "rhythm", "--trials", "2",
             "--epochs", "1", "--search-space", str(space), "--out", str(out), "--tracking-uri", uri, *FAST])
    status = _wait(head, "tune-e2e")
    wall = time.monotonic() - started
    print(f"\nray job submit e2e: head up in {cluster['head_start_s']:.0f} s; tune job (2 trials x 1 epoch) "
          f"{wall:.0f} s from submit to {status}")
    return {"status": status, "out": out, "logs": _console(_logs(head, "tune-e2e")), "uri": uri, "wall": wall}


def test_a_submitted_study_finishes_with_its_runs_in_the_server(tune_job):
    assert tune_job["status"] == "SUCCEEDED", tune_job["logs"][-4000:]
    best = json.loads((tune_job["out"] / "best.json").read_text())
    assert best["mlflow"]["tracking_uri"] == tune_job["uri"]
    runs = _runs(tune_job["uri"], "ecgsearch-rhythm")
    parent = next(r for r in runs if r.info.run_id == best["mlflow"]["parent_run_id"])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert {r.info.status for r in trials} == {"FINISHED"} and best["mlflow"]["run_id"] in {r.info.run_id for r in trials}


def test_the_job_console_is_our_progress_and_summary_not_rays_output(tune_job):
    text = tune_job["logs"]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[0].startswith("study resnet1d_tiny-rhythm-study: 2 trials x 1 epoch of") and "ray.log" in lines[0]
    assert "[tune] 2 trials: 2/2 done" in text
    assert sum(" done after 1/1 epochs: macro_auprc=" in ln and "best so far: trial " in ln for ln in lines) == 2
    assert any(ln.startswith("best trial ") for ln in lines)
    for noise in ("(pid=", "(raylet)", "Trial status", "Trial name", "╭", "View detailed results", "TensorBoard",
                  "A new study created", "mlflow."):
        assert noise not in text, f"{noise!r} in the job's console:\n{text}"
    assert len(lines) <= 12, text
    assert "joined Ray cluster" in (tune_job["out"] / "ray.log").read_text()


def _finished_units(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return {}


def test_a_stopped_search_leaves_no_run_running_and_its_resubmission_redoes_nothing(cluster, make_synth_cache):
    head, uri, out = cluster["head"], cluster["server"].uri, cluster["root"] / "rle"
    cache = make_synth_cache(records=360, seed=0, informative_leads=("V2", "AVL"))
    args = ["--data", str(cache), "--task", "superclass", "--model", "mlresnet_tiny", "--mode", "retrain",
            "--start-leads", "AVL,V2,V5", "--min-leads", "2", "--repeats", "1", "--epochs", "2", "--no-baselines",
            "--out", str(out), "--tracking-uri", uri, "--set", "batch_size=16", "--set", "lr=5e-3",
            "--set", "n_samples=512", "--set", "model_kwargs.stem_stride=2", *FAST]
    started = time.monotonic()
    _submit(head, "rle-e2e-1", "jobs/rle_job.py", args)
    # Stop mid-search: the start set's model and at least one candidate are done, not all of them.
    status = _wait(head, "rle-e2e-1", until=lambda: sum(k.startswith("train:") for k in _finished_units(out)) >= 2)
    assert status == "RUNNING", f"the search ended ({status}) before it could be stopped:\n{_logs(head, 'rle-e2e-1')[-3000:]}"
    stop_at = time.monotonic()
    stopped = head.ray("job", "stop", "rle-e2e-1", "--address", head.address, timeout=300)
    stop_s = time.monotonic() - stop_at
    assert stopped.returncode == 0 and _status(head, "rle-e2e-1") == "STOPPED", stopped.stdout + stopped.stderr
    before = _finished_units(out)
    assert not (out / "rle.json").exists() and len([k for k in before if k.startswith("train:")]) < 4
    runs = _runs(uri, "ecgsearch-superclass")
    assert runs and [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    search = [r for r in runs if r.data.tags.get("kind") == "search"]
    logs = _logs(head, "rle-e2e-1")
    assert len(search) == 1 and search[0].info.status == "KILLED", (search[0].data.tags.get("error"), logs[-3000:])
    assert "--resume" in logs, logs[-3000:]   # the driver said how to continue

    resumed_at = time.monotonic()
    _submit(head, "rle-e2e-2", "jobs/rle_job.py", [*args, "--resume"])
    assert _wait(head, "rle-e2e-2") == "SUCCEEDED", _logs(head, "rle-e2e-2")[-4000:]
    resume_s = time.monotonic() - resumed_at
    rle = json.loads((out / "rle.json").read_text())
    assert rle["kept"] == ["AVL", "V2"] and not set(before) & set(rle["units_run_here"])
    after = _finished_units(out)
    for uid, res in before.items():           # finished work kept as it was, not redone
        assert after[uid]["finished"] == res["finished"], uid
    runs = _runs(uri, "ecgsearch-superclass")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert any(r.data.tags.get("kind") == "search" and r.info.status == "FINISHED" for r in runs)
    print(f"\nray job submit e2e: rle job stopped {stop_at - started:.0f} s after submit, "
          f"`ray job stop` took {stop_s:.1f} s; the --resume job finished in {resume_s:.0f} s")



def test_the_tracking_server_keeps_the_study_in_postgresql(cluster, tune_job):
    if cluster["pg"] is None:
        pytest.skip(cluster["why_not_pg"])
    import psycopg

    assert tune_job["status"] == "SUCCEEDED"
    best = json.loads((tune_job["out"] / "best.json").read_text())
    with psycopg.connect(cluster["pg"].uri) as conn, conn.cursor() as cur:
        cur.execute("select run_uuid, status from runs")
        runs = dict(cur.fetchall())
        cur.execute("select name, alias, version from registered_model_aliases")
        aliases = cur.fetchall()
    assert runs[best["mlflow"]["parent_run_id"]] == "FINISHED" and runs[best["mlflow"]["run_id"]] == "FINISHED"
    assert (best["mlflow"]["registered_model"], "champion", int(best["mlflow"]["version"])) in aliases

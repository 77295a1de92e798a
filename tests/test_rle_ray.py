"""The lead search on real Ray Tune trials with real MLflow (sqlite), and a multi-worker
TorchTrainer inside a Tune trial (Train V2: the trial reserves 0 CPUs)."""
from __future__ import annotations

import json

import pytest
from ray_fixtures import ray_session  # noqa: F401

from ecgsearch.engine import TrainConfig
from ecgsearch.search.context import SearchSettings
from ecgsearch.search.pipeline import run_rle, run_subsets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

START = ("AVL", "V2", "V5")
SPLITS = {"train": [1, 2, 3, 4, 5, 6, 7], "val": [8, 9], "test": [10]}


@pytest.fixture(scope="module")
def searched(ray_session, make_synth_cache, tmp_path_factory):  # noqa: F811
    cache = make_synth_cache(records=360, seed=0, informative_leads=("V2", "AVL"))
    tmp = tmp_path_factory.mktemp("rle-ray")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = TrainConfig(batch_size=16, lr=5e-3, n_samples=512, bootstrap=20, precision="fp32",
                       splits=SPLITS, model_kwargs={"stem_stride": 2})
    common = dict(data=str(cache), task="superclass", model="mlresnet_tiny", base=base, executor="ray",
                  tracking_uri=uri, experiment="rle-test", repeats=1, epochs=2)
    rle = run_rle(SearchSettings(**common, out=tmp / "rle", mode="retrain", start_leads=START, min_leads=2,
                                 baselines=False))
    sub = run_subsets(SearchSettings(**common, out=tmp / "sub", mode="eval", eval_model="per-step",
                                     workers_per_trial=2), 2,
                      pool=START, rle_dir=tmp / "rle")
    return {"tmp": tmp, "uri": uri, "rle": rle, "sub": sub}


def test_candidates_ran_as_parallel_tune_trials(searched):
    out = searched["tmp"] / "rle"
    state = json.loads((out / "state.json").read_text())["results"]
    cands = [state[f"train:{k}@0"] for k in ("AVL,V2", "AVL,V5", "V2,V5")]
    # three 1-CPU trials on a 2-CPU Ray: each ran in its own worker process, two at once
    assert len({c["pid"] for c in cands}) >= 2
    spans = sorted((c["started"], c["finished"]) for c in cands)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two candidates overlapped: {spans}"
    batch = [d for d in (out / "tune").iterdir() if "candidate_units" in d.name]
    assert len(batch) == 1 and len([t for t in batch[0].iterdir() if t.name.startswith("train_")]) == 3
    assert searched["rle"]["kept"] == ["AVL", "V2"]


def test_mlflow_holds_parent_step_and_candidate_runs_with_leads(searched):
    from mlflow import MlflowClient

    client = MlflowClient(searched["uri"])
    exp = client.get_experiment_by_name("rle-test")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[searched["rle"]["mlflow"]["parent_run_id"]]
    assert parent.info.status == "FINISHED" and parent.data.params["mode"] == "retrain"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"rle.json", "rle.md", "metric_vs_leads.png", "elimination_order.png"} <= arts
    # the test metric per lead count, charted in the UI with step = number of leads
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "test_macro_auprc")}
    assert history == pytest.approx({e["n_leads"]: e["test"]["macro_auprc"] for e in searched["rle"]["by_n_leads"]})
    steps = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
             and r.data.tags.get("kind") == "step"]
    assert len(steps) == 1
    step = steps[0]
    assert step.data.params["leads"] == "AVL,V2,V5" and step.data.params["n_leads"] == "3"
    assert step.data.tags["removed"] == "V5" and step.info.status == "FINISHED"
    cands = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == step.info.run_id]
    assert sorted(r.data.params["leads"] for r in cands) == ["AVL,V2", "AVL,V5", "V2,V5"]
    scores = {c["leads_key"]: c["score"] for c in searched["rle"]["steps"][0]["candidates"]}
    for r in cands:
        assert r.data.tags["leads"] == r.data.params["leads"] and r.data.tags["n_leads"] == "2"
        assert r.data.params["n_leads"] == "2" and r.info.status == "FINISHED"
        assert r.data.metrics["score"] == pytest.approx(scores[r.data.params["leads"]])
    # the UI's filter syntax finds candidates by lead count
    found = client.search_runs([exp.experiment_id], filter_string="params.n_leads = '2' and tags.kind = 'candidate'")
    assert len(found) >= 3


def test_subsets_with_a_two_worker_torchtrainer_per_trial(searched):
    sub = searched["sub"]
    state = json.loads((searched["tmp"] / "sub" / "state.json").read_text())["results"]
    pool_model = state["train:AVL,V2,V5@0"]
    assert pool_model["epochs_run"] == 2 and (searched["tmp"] / "sub" / pool_model["checkpoint"]).is_file()
    assert [r["leads_key"] for r in sub["ranking"]][0] == "AVL,V2"
    assert sub["rle"]["leads_key"] == "AVL,V2" and sub["rle"]["rank"] == 1 and sub["rle"]["of"] == 3
    assert (searched["tmp"] / "sub" / "models" / "AVL-V2-V5" / "seed0" / "ray").is_dir()   # Ray Train's run folder

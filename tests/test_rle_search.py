"""Lead search end to end on planted synthetic data: ground truth, eval-mode equivalence, resume.

Planted data: the label information of the synthetic set lives in V2 and AVL only (every
other lead is a decoy patient's ECG), so a working RLE must keep both. Superclass task:
its marker bursts sit above most ECG energy and `mlresnet_tiny` learns them in a few
epochs. These searches run in-process (`executor="local"`); test_rle_ray.py runs the same
pipeline through real Ray Tune trials and MLflow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgsearch.data.cache import load_cache
from ecgsearch.engine import TrainConfig, load_checkpoint, train
from ecgsearch.engine import prep as P
from ecgsearch.leads import lead_indices
from ecgsearch.search.candidates import load_predictions, run_unit
from ecgsearch.search.context import SearchSettings
from ecgsearch.search.pipeline import run_rle
from ecgsearch.tasks import get_task

PLANTED = ("AVL", "V2")
# Start sets of the per-step and retrain checks: they retrain models at every step, so they
# start from a reduced set holding noise leads of both kinds (limb and precordial).
PER_STEP_START = ("I", "II", "AVR", "AVL", "V1", "V2", "V4", "V6")
RETRAIN_START = ("I", "AVL", "V1", "V2", "V5")
REPO = Path(__file__).resolve().parents[1]
# Two folds of validation (~70 records) make candidate scores far less noisy than one.
SPLITS = {"train": [1, 2, 3, 4, 5, 6, 7], "val": [8, 9], "test": [10]}
# The non-inferiority check needs a test fold large enough to bound a delta near 0.
NI_SPLITS = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}
NI_MARGIN = 0.03

pytestmark = pytest.mark.slow


def base_config(seed: int, **kw) -> TrainConfig:
    # 512 samples = the centred 5.1 s: half the cost of the full 10 s, and most records
    # still hold a marker burst of each of their classes. A stem stride of 2 halves the
    # branches' cost again and, on this data, learns the planted bursts in fewer epochs.
    return TrainConfig(**{"batch_size": 16, "lr": 5e-3, "n_samples": 512, "bootstrap": 50,
                          "precision": "fp32", "threads": 1, "splits": SPLITS, "seed": seed,
                          "model_kwargs": {"stem_stride": 2, "lead_dropout": 0.1}, **kw})


@pytest.fixture(scope="session")
def planted(make_synth_cache):
    def get(seed: int, records: int = 360) -> Path:
        return make_synth_cache(records=records, seed=seed, informative_leads=PLANTED)
    return get


_RUNS: dict = {}


def planted_run(planted, tmp_path_factory, mode: str, seed: int) -> dict:
    """One search per (mode, seed) per session: the resume test reuses the retrain run."""
    if (mode, seed) not in _RUNS:
        out = tmp_path_factory.mktemp(f"rle-{mode}-{seed}")
        if mode == "shared":
            # The check: 12 -> 2 leads with repeats, answered by non-inferiority. bf16
            # training (AMX) halves the cost; scoring is fp32 regardless.
            s = SearchSettings(data=str(planted(seed, 600)), task="superclass", model="mlresnet_tiny", out=out,
                               mode="eval", eval_model="shared",
                               base=base_config(seed, splits=NI_SPLITS, precision="auto", bootstrap=300),
                               min_leads=2, repeats=2, epochs=15, patience=4, margin=NI_MARGIN,
                               executor="local", tracking=False, baselines=True)
        else:
            eval_mode = mode == "per-step"
            s = SearchSettings(data=str(planted(seed)), task="superclass", model="mlresnet_tiny", out=out,
                               mode="eval" if eval_mode else "retrain", eval_model="per-step",
                               base=base_config(seed), start_leads=PER_STEP_START if eval_mode else RETRAIN_START,
                               min_leads=3, repeats=1, epochs=6, executor="local", tracking=False, baselines=False)
        _RUNS[(mode, seed)] = (out, run_rle(s))
    return _RUNS[(mode, seed)]


# Seed 0 in `make test` (42 s a seed); ECGSEARCH_TEST_SEEDS=0,1,2 repeats it over data sets
# (all three passed when this was written: docs/LEAD_SEARCH.md).
SEEDS = [int(x) for x in os.environ.get("ECGSEARCH_TEST_SEEDS", "0").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_planted_leads_survive_with_repeats_and_are_noninferior(planted, tmp_path_factory, seed):
    """12 -> 2 leads, 2 seeds per unit, one shared masked model: the planted pair is kept, is
    non-inferior to 12 leads at the margin, and a Challenge set lacking a planted lead is not."""
    out, r = planted_run(planted, tmp_path_factory, "shared", seed)
    assert r["kept"] == list(PLANTED), f"seed {seed}: kept {r['kept']}, order {r['elimination_order']}"
    assert r["settings"]["repeats"] == 2 and len(r["steps"]) == 10
    for st in r["steps"]:
        assert st["removed"] not in PLANTED
        for c in st["candidates"]:                         # every candidate scored on both seeds
            assert len(c["seed_scores"]) == 2 and c["score"] == pytest.approx(np.mean(c["seed_scores"]))
        lo, hi = st["margin_ci"]
        assert lo <= st["margin"] <= hi and st["decisive"] == (lo > 0)
    # the last step chooses between the two planted leads and a noise lead: decisive
    assert r["steps"][-1]["decisive"] and r["steps"][-1]["runner_up"] in PLANTED
    ni = {",".join(e["leads"]): e for e in r["noninferiority"]}
    pair = ni["AVL,V2"]
    assert pair["noninferior"] and pair["ci"][0] > -NI_MARGIN, pair
    lacking = ni["I,II,V2"]                                 # the Challenge 3-lead set, without AVL
    assert not lacking["noninferior"] and lacking["verdict"] == "inferior", lacking
    assert r["answer"]["leads"] == list(PLANTED) and r["answer"]["n_leads"] == 2
    assert r["answer_line"].startswith("AVL,V2 (2 leads) is non-inferior to 12 leads")
    # the ensemble's two-level interval is at least as wide as the records-only one
    for e in r["by_n_leads"]:
        iv = e["intervals"]["macro_auroc"]
        assert iv["ci"][0] <= iv["value"] <= iv["ci"][1] and len(iv["per_seed"]) == 2
    md = (out / "rle.md").read_text()
    assert md.splitlines()[2] == f"**Answer: {r['answer_line']}.**"
    saved = json.loads((out / "rle.json").read_text())
    assert saved["answer"]["leads"] == list(PLANTED) and saved["settings"]["margin"] == NI_MARGIN
    assert (out / "metric_vs_leads.png").stat().st_size > 10_000


@pytest.mark.parametrize("mode", ["per-step", "retrain"])
def test_planted_leads_survive_per_step_and_retrain_elimination(planted, tmp_path_factory, mode):
    out, r = planted_run(planted, tmp_path_factory, mode, 0)
    start = PER_STEP_START if mode == "per-step" else RETRAIN_START
    assert set(PLANTED) <= set(r["kept"]), f"{mode}: kept {r['kept']}, order {r['elimination_order']}"
    assert len(r["kept"]) == 3 and len(r["steps"]) == len(start) - 3
    for st in r["steps"]:
        scores = {c["removed"]: c["score"] for c in st["candidates"]}
        assert set(scores) == set(st["leads"])            # every candidate was scored
        assert st["removed"] not in PLANTED
        # removing a planted lead scores worse than the removal actually made
        assert all(scores[p] < st["score"] for p in PLANTED if p in scores)
    # a model per lead count on the path, each with test metrics and bootstrap CIs
    assert [e["n_leads"] for e in r["by_n_leads"]] == list(range(len(start), 2, -1))
    for e in r["by_n_leads"]:
        lo, hi = e["test"]["ci"]["macro_auprc"]
        assert lo <= e["test"]["macro_auprc"] <= hi
        assert all((out / "models").rglob("model.ckpt"))
    # one seed measures no training variance, and the report says so
    assert any("repeats=1" in w for w in r["warnings"])


def test_eval_mode_drop_equals_fresh_subset_model(planted, tmp_path):
    """Scoring a candidate by dropping a branch == a fresh ML-ResNet for the subset, same weights."""
    cache = str(planted(0))
    leads = ("I", "AVL", "V2", "V5")
    res = train(base_config(0, epochs=1, leads=leads, model="mlresnet_tiny", task="superclass"), cache,
                tmp_path / "m")
    unit = {"id": "predict:test", "kind": "predict", "checkpoint": str(res.checkpoint_path), "data": cache,
            "drop": ["AVL"], "threads": 1, "preds": str(tmp_path / "p.npz")}
    run_unit(unit)
    saved = load_predictions(tmp_path / "p.npz")
    dropped = get_task("superclass").compute_metrics(saved["val_y"], saved["val_p"])["macro_auprc"]

    ck = load_checkpoint(res.checkpoint_path)
    kept = ("I", "V2", "V5")
    sub = ck.model.select_leads(lead_indices(kept, leads)).eval()
    data = load_cache(cache)
    prep = P.from_checkpoint(ck, data)
    idx = P.split_indices(data, prep.task, SPLITS, "val")
    x, _, y = P.batch(prep, data, idx, with_natural=True)
    with torch.no_grad():
        masked = ck.model(torch.from_numpy(x), lead_mask=torch.tensor([True, False, True, True]))
        fresh = sub(torch.from_numpy(x[:, lead_indices(kept, leads)]))
    torch.testing.assert_close(masked, fresh, rtol=1e-5, atol=1e-6)
    p = P.decode(prep, fresh.numpy())
    manual = get_task("superclass").compute_metrics(y, p)["macro_auprc"]
    assert dropped == pytest.approx(manual, abs=1e-6)
    # a different branch gives a different score: the comparison above is not vacuous
    np.testing.assert_allclose(saved["val_p"], p, rtol=1e-5, atol=1e-6)
    run_unit({**unit, "drop": ["V5"], "preds": str(tmp_path / "q.npz")})
    other = load_predictions(tmp_path / "q.npz")
    assert dropped != pytest.approx(get_task("superclass").compute_metrics(other["val_y"], other["val_p"])
                                    ["macro_auprc"], abs=1e-4)


def _wait_for(path: Path, pred, timeout: float, proc) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"search exited early ({proc.returncode}); see {path.parent.parent / 'killed.log'}")
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError:   # never torn (atomic rename), but be safe
                state = None
            if state and pred(state):
                return state
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {path}")


def test_resume_after_kill_redoes_no_candidate_and_follows_the_same_path(planted, tmp_path_factory, tmp_path):
    ref_out, ref = planted_run(planted, tmp_path_factory, "retrain", 0)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"config": base_config(0).to_dict()}))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ecgsearch", "rle", "--data", str(planted(0)), "--task", "superclass",
           "--model", "mlresnet_tiny", "--mode", "retrain", "--start-leads", ",".join(RETRAIN_START),
           "--repeats", "1", "--epochs", "6",
           "--min-leads", "3", "--config", str(cfg), "--no-baselines", "--no-tracking",
           "--executor", "local", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # kill in step 1, after two of its five candidates are recorded
        state = _wait_for(out / "state.json", lambda s: sum(k.startswith("train:") for k in s["results"]) >= 2,
                          240, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
    before = set(json.loads((out / "state.json").read_text())["results"])
    assert before >= set(state["results"]) and not (out / "rle.json").exists()

    s = SearchSettings(data=str(planted(0)), task="superclass", model="mlresnet_tiny", out=out, mode="retrain",
                       base=base_config(0), start_leads=RETRAIN_START, min_leads=3, executor="local",
                       tracking=False, baselines=False, resume=True, repeats=1, epochs=6)
    resumed = run_rle(s)
    assert not before & set(resumed["units_run_here"]), "a finished candidate was trained again"
    assert resumed["elimination_order"] == ref["elimination_order"] and resumed["kept"] == ref["kept"]
    for a, b in zip(resumed["steps"], ref["steps"]):
        assert [c["removed"] for c in a["candidates"]] == [c["removed"] for c in b["candidates"]]
        np.testing.assert_allclose([c["score"] for c in a["candidates"]], [c["score"] for c in b["candidates"]],
                                   rtol=1e-6)
    # resuming again with different settings is refused, naming the setting
    with pytest.raises(ValueError, match=r"settings differ .*\(config.lr: saved 0.005, now 0.001\)"):
        run_rle(SearchSettings(**{**s.__dict__, "base": base_config(0, lr=1e-3), "out": out}))


def test_real_ptbxl_sample_runs_through_the_search(ptbxl_sample, tmp_path):
    """The pipeline on real PTB-XL files (age task, eval mode, 4 -> 3 leads, one epoch)."""
    from ecgsearch.data.cache import prepare

    cache = tmp_path / "cache"
    prepare(ptbxl_sample, cache, 100)
    s = SearchSettings(data=str(cache), task="age", model="mlresnet_tiny", out=tmp_path / "out", mode="eval",
                       base=TrainConfig(batch_size=32, bootstrap=20, precision="fp32", threads=1),
                       start_leads=("I", "II", "V1", "V2"), min_leads=3, executor="local", tracking=False,
                       baselines=False, repeats=1, epochs=1, eval_model="per-step")
    r = run_rle(s)
    assert r["settings"]["metric"] == "mae" and r["settings"]["metric_mode"] == "min"
    step = r["steps"][0]
    assert step["score"] == min(c["score"] for c in step["candidates"])   # lowest MAE wins
    assert all(0 < e["test"]["mae"] < 100 for e in r["by_n_leads"])

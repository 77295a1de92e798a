"""Tasks: targets from a cache, training-fold state, losses by hand, decoding, selection."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgsearch import metrics as M
from ecgsearch.leads import LABEL_SETS, LEADS, RHYTHM_CODES, SUPERCLASSES
from ecgsearch.tasks import AGE_BIN_WIDTH, get_task, list_tasks


class TinyCache:
    """The part of the ECGCache contract tasks use: meta with label columns, labels(), ages()."""

    def __init__(self, meta: pd.DataFrame):
        self.meta = meta

    def labels(self, label_set, idx=None):
        cols = [f"{label_set}/{c}" for c in LABEL_SETS[label_set]]
        y = self.meta[cols].to_numpy(np.float32)
        return y if idx is None else y[idx]

    def ages(self, idx=None):
        a = self.meta["age"].to_numpy(np.float32)
        return a if idx is None else a[idx]


@pytest.fixture(scope="module")
def cache() -> TinyCache:
    n = 12
    meta = pd.DataFrame({"ecg_id": np.arange(1, n + 1), "strat_fold": np.arange(n) % 10 + 1,
                         "age": [25, 40, np.nan, 61, 70, 33, 58, np.nan, 47, 80, 66, 52]})
    # class c is positive in records 0..c (so 1, 2, 3, ... positives)
    for c, code in enumerate(RHYTHM_CODES):
        meta[f"rhythm/{code}"] = (np.arange(n) <= c).astype(np.int8)
    for c, code in enumerate(SUPERCLASSES):
        meta[f"superclass/{code}"] = (np.arange(n) % (c + 2) == 0).astype(np.int8)
    return TinyCache(meta)


# ------------------------------------------------------------------------- registry

def test_registry_and_task_descriptions():
    assert list_tasks() == ["age", "reconstruct", "rhythm", "superclass"]
    want = {"rhythm": ("multilabel", RHYTHM_CODES, "macro_auprc", "max"),
            "superclass": ("multilabel", SUPERCLASSES, "macro_auprc", "max"),
            "age": ("regression", ("age",), "mae", "min"),
            "reconstruct": ("reconstruction", LEADS, "mean_r", "max")}
    for name, (kind, outs, metric, mode) in want.items():
        t = get_task(name)
        assert (t.name, t.kind, t.output_names, t.selection_metric, t.mode) == (name, kind, outs, metric, mode)
        assert t.num_outputs() == len(outs)
    with pytest.raises(ValueError, match="unknown task 'rythm'; known tasks: age, reconstruct, rhythm, superclass"):
        get_task("rythm")


def test_better_respects_mode_and_nan():
    up, down = get_task("rhythm"), get_task("age")
    assert up.better(0.6, 0.5) and not up.better(0.5, 0.6) and not up.better(0.5, 0.5)
    assert down.better(4.0, 5.0) and not down.better(5.0, 4.0)
    for t in (up, down):
        assert not t.better(math.nan, 0.1) and t.better(0.1, math.nan) and not t.better(math.nan, math.nan)


# ---------------------------------------------------------------------- multilabel

def test_multilabel_targets_and_pos_weight_by_hand(cache):
    t = get_task("rhythm")
    idx = np.arange(10)
    y = t.targets(cache, idx)
    assert y.dtype == np.float32 and y.shape == (10, 6)
    assert t.sample_mask(cache, idx).all()
    state = t.fit_target_state(y)
    # class c has c+1 positives among 10 records -> pos_weight (9-c)/(c+1)
    assert state["pos_weight"] == pytest.approx([9 / 1, 8 / 2, 7 / 3, 6 / 4, 5 / 5, 4 / 6])
    assert state["positives"] == [1, 2, 3, 4, 5, 6]
    assert json.loads(json.dumps(state)) == state


def test_superclass_drops_unlabeled_records_rhythm_and_age_keep_their_rules(cache):
    idx = np.arange(12)
    sup = get_task("superclass")
    # record i is positive for class c when i % (c + 2) == 0: records 1, 7, 11 have no superclass
    unlabeled = [i for i in idx if not any(i % (c + 2) == 0 for c in range(len(SUPERCLASSES)))]
    assert unlabeled == [1, 7, 11]
    assert np.flatnonzero(~sup.sample_mask(cache, idx)).tolist() == unlabeled
    assert sup.sample_mask(cache, idx, keep_unlabeled=True).all()
    assert sup.requires_label and not get_task("rhythm").requires_label
    # rhythm records 6..11 carry none of the six codes: valid negatives, kept either way
    rhy = get_task("rhythm")
    assert not get_task("rhythm").targets(cache, idx)[6:].any()
    assert rhy.sample_mask(cache, idx).all() and rhy.sample_mask(cache, idx, keep_unlabeled=True).all()
    # a missing age stays excluded whatever keep_unlabeled says
    age = get_task("age")
    assert (age.sample_mask(cache, idx, keep_unlabeled=True) == age.sample_mask(cache, idx)).all()
    assert (~age.sample_mask(cache, idx)).sum() == 2


def test_class_without_training_positives_is_named(cache):
    t = get_task("rhythm")
    y = t.targets(cache, np.arange(10)).copy()
    y[:, 2] = 0
    with pytest.raises(ValueError, match="CLBBB have no positive example in the 10 training records"):
        t.fit_target_state(y)
    y[:, 2] = 1
    with pytest.raises(ValueError, match="CLBBB are positive in every one"):
        t.fit_target_state(y)


def test_bce_loss_with_pos_weight_by_hand():
    t = get_task("superclass")
    pw = [2.0, 0.5, 1.0, 4.0, 3.0]
    loss = t.make_loss({"pos_weight": pw})
    assert "inner.pos_weight" in dict(loss.named_buffers())   # moves with loss.to(device)
    logits = [[0.3, -1.2, 2.0, 0.0, -0.4], [1.5, 0.7, -2.2, 0.9, 0.1]]
    labels = [[1.0, 0, 1, 0, 1], [0, 1, 0, 1, 0]]
    want = 0.0
    for i in range(2):
        for c in range(5):
            s = 1 / (1 + math.exp(-logits[i][c]))
            yy = labels[i][c]
            want += -(pw[c] * yy * math.log(s) + (1 - yy) * math.log(1 - s))
    x = torch.tensor(logits, requires_grad=True)
    got = loss(x, torch.tensor(labels))
    assert float(got.detach()) == pytest.approx(want / 10, rel=1e-6)
    got.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_multilabel_decode_is_a_stable_sigmoid_and_metrics_dispatch():
    t = get_task("rhythm")
    logits = np.array([[-1000.0, -3.0, 0.0, 0.5, 3.0, 1000.0]])
    probs = t.decode_outputs(logits, {})
    np.testing.assert_allclose(probs, torch.sigmoid(torch.tensor(logits)).numpy(), atol=1e-6)
    assert probs[0, 0] == 0.0 and probs[0, -1] == 1.0
    rng = np.random.default_rng(0)
    y = (rng.random((60, 6)) < 0.3).astype(np.float32)
    p = t.decode_outputs(rng.normal(size=(60, 6)) + 2 * y, {})
    m = t.compute_metrics(y, p, bootstrap=200, seed=3)
    assert m == M.classification_metrics(y, p, RHYTHM_CODES, bootstrap=200, seed=3)
    assert m[t.selection_metric] > 0.5


# ----------------------------------------------------------------------------- age

def test_age_mask_targets_and_state(cache):
    t = get_task("age")
    idx = np.arange(12)
    mask = t.sample_mask(cache, idx)
    assert mask.tolist() == [True, True, False] + [True] * 4 + [False] + [True] * 4
    y = t.targets(cache, idx)
    assert y.shape == (12, 1) and np.isnan(y[2, 0])
    with pytest.raises(ValueError, match="2 training age"):
        t.fit_target_state(y)
    state = t.fit_target_state(y[mask])
    ages = y[mask, 0].astype(np.float64)
    assert state["mean"] == pytest.approx(ages.mean()) and state["std"] == pytest.approx(ages.std())
    z = t.encode_targets(y[mask], state)
    assert z.mean() == pytest.approx(0.0, abs=1e-6) and z.std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(t.decode_outputs(z, state), y[mask], rtol=1e-6)
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(ValueError, match="lacks mean, std"):
        t.decode_outputs(z, {})


def test_age_l1_loss_and_regression_metrics():
    t = get_task("age")
    state = t.fit_target_state(np.array([[30.0], [50.0], [70.0]]))
    loss = t.make_loss(state)                              # default: L1 on standardised ages
    out = torch.tensor([[0.0], [1.0], [-1.0]])
    tgt = torch.tensor([[0.5], [1.0], [1.0]])
    assert float(loss(out, tgt)) == pytest.approx((0.5 + 0 + 2) / 3)
    m = t.compute_metrics(np.array([[30.0], [50.0], [70.0]]), np.array([[35.0], [50.0], [60.0]]))
    assert m["mae"] == pytest.approx(5.0) and m["n"] == 3


def test_weighted_mse_upweights_rare_ages():
    t = get_task("age")
    ages = np.array([50.0] * 90 + [80.0] * 10)[:, None]
    state = t.fit_target_state(ages)
    # two occupied 5-year bins: weight = n / (bins * count) -> 100/180 and 100/20
    w = np.array(state["bin_weights"])
    counts = np.array(state["bin_counts"])
    assert state["bin_width"] == AGE_BIN_WIDTH and counts.sum() == 100
    assert w[counts == 90] == pytest.approx(100 / 180) and w[counts == 10] == pytest.approx(5.0)
    assert (w[counts == 0] == 5.0).all()                  # unseen bins count as the rarest
    loss = t.make_loss(json.loads(json.dumps(state)), age_loss="weighted_mse")
    z = torch.from_numpy(t.encode_targets(ages, state))
    per_sample = loss.inner.sample_weights(z)
    assert float(per_sample.mean()) == pytest.approx(1.0)  # normalised to mean 1 on the train set
    common, rare = z[:1], z[-1:]
    err_common = float(loss(common + 1.0, common))
    err_rare = float(loss(rare + 1.0, rare))
    assert err_rare == pytest.approx(9.0 * err_common)     # same error, 9x the weight
    plain = t.make_loss(state, age_loss="mse")
    assert float(plain(rare + 1.0, rare)) == pytest.approx(float(plain(common + 1.0, common)))


def test_real_sample_age_weights():
    root = os.environ.get("ECGSEARCH_PTBXL_SAMPLE")
    if not root:
        pytest.skip("ECGSEARCH_PTBXL_SAMPLE is not set (path to the real PTB-XL sample)")
    db = pd.read_csv(Path(root) / "ptbxl_database.csv")
    train = db[db["strat_fold"] <= 8]
    ages = train["age"].dropna().to_numpy(np.float64)[:, None]
    t = get_task("age")
    state = t.fit_target_state(ages)
    loss = t.make_loss(state, age_loss="weighted_mse")
    w = loss.inner.sample_weights(torch.from_numpy(t.encode_targets(ages, state)))
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    counts = np.array(state["bin_counts"])
    weights = np.array(state["bin_weights"])
    seen = counts > 0
    # rarer bins weigh more: weights are in exactly the reverse order of the counts
    assert np.all(np.diff(weights[seen][np.argsort(counts[seen])]) <= 0)
    oldest = float(ages.max())
    assert float(loss.inner.sample_weights(torch.tensor(t.encode_targets([[oldest]], state)))) \
        > float(loss.inner.sample_weights(torch.tensor(t.encode_targets([[float(np.median(ages))]], state))))


# ------------------------------------------------------------------- reconstruction

def test_reconstruct_task():
    t = get_task("reconstruct")
    with pytest.raises(NotImplementedError, match="signals_mv"):
        t.targets(None, np.arange(3))
    assert t.fit_target_state(np.zeros((2, 12, 5))) == {}
    out = torch.tensor([[[1.0, -1.0]], [[0.0, 2.0]]])
    tgt = torch.zeros_like(out)
    assert float(t.make_loss({})(out, tgt)) == pytest.approx(1.0)
    assert float(t.make_loss({}, recon_loss="mse")(out, tgt)) == pytest.approx(1.5)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(8, 12, 50))
    m = t.compute_metrics(y, y * 3.0, bootstrap=0)
    assert m[t.selection_metric] == pytest.approx(1.0) and set(m["r"]) == set(LEADS)


# -------------------------------------------------------------------- loss options

@pytest.mark.parametrize("task, opts, match", [
    ("rhythm", {"age_loss": "l1"}, "unknown loss option.s. age_loss; known options: none"),
    ("age", {"recon_loss": "l1"}, "unknown loss option.s. recon_loss; known options: age_loss"),
    ("age", {"age_loss": "huber"}, "age_loss='huber' is not one of l1, weighted_mse, mse"),
    ("reconstruct", {"recon_loss": "l2"}, "recon_loss='l2' is not one of l1, mse"),
])
def test_bad_loss_options_are_named(task, opts, match):
    state = {"pos_weight": [1.0] * 6, "mean": 50.0, "std": 10.0, "bin_start": 0.0, "bin_width": 5.0,
             "bin_weights": [1.0]}
    with pytest.raises(ValueError, match=match):
        get_task(task).make_loss(state, **opts)


def test_loss_refuses_broadcasting_shapes():
    t = get_task("age")
    loss = t.make_loss(t.fit_target_state(np.array([[30.0], [50.0]])))
    with pytest.raises(ValueError, match=r"outputs \(4, 1\) and targets \(4,\)"):
        loss(torch.zeros(4, 1), torch.zeros(4))

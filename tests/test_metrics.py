"""Metrics: hand-computed values, agreement with scikit-learn/scipy, bootstrap behaviour."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import (average_precision_score, f1_score, mean_absolute_error, r2_score, recall_score,
                             roc_auc_score)

from ecgsearch import metrics as M
from ecgsearch.leads import LEADS, RHYTHM_CODES


def _toy_multilabel(n: int, seed: int, k: int = 3, rate: float = 0.3):
    """Labels with a real signal in the scores, rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rate).astype(np.float64)
    p = np.round(rng.random((n, k)) * 0.7 + 0.4 * y, 1)
    return y, p


# ------------------------------------------------------------------ hand-checked values

def test_auroc_by_hand():
    # positives .35 and .8 vs negatives .1 and .4: .35 beats only .1 -> 3 of 4 pairs
    assert M.auroc_per_class([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx([0.75])
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert M.auroc_per_class([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx([0.875])


def test_auprc_by_hand():
    # descending: .8(+) .4(-) .35(+) .1(-): precision at the positives 1/1 and 2/3
    assert M.auprc_per_class([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx([(1 + 2 / 3) / 2])
    # tied group {.8: -, -, +} is one threshold: precision 2/4 there, then 3/5 at .1
    assert M.auprc_per_class([1, 0, 0, 1, 1], [0.9, 0.8, 0.8, 0.8, 0.1]) == pytest.approx([(1 + 0.5 + 0.6) / 3])


@pytest.mark.parametrize("seed", range(6))
def test_per_class_matches_sklearn_with_ties(seed):
    y, p = _toy_multilabel(150, seed, k=4)
    want_roc = [roc_auc_score(y[:, c], p[:, c]) for c in range(4)]
    want_ap = [average_precision_score(y[:, c], p[:, c]) for c in range(4)]
    np.testing.assert_allclose(M.auroc_per_class(y, p), want_roc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(M.auprc_per_class(y, p), want_ap, rtol=0, atol=1e-12)


def test_batched_statistics_match_sklearn_per_resample():
    # the bootstrap's vectorised formula must give, row by row, what sklearn gives on that resample
    y, p = _toy_multilabel(80, 11, k=2, rate=0.2)
    idx = np.random.default_rng(3).integers(0, 80, size=(15, 80))
    stats = M._classification_stats(y[idx], p[idx])          # (15, 2 + 2k)
    for b in range(15):
        yb, pb = y[idx[b]], p[idx[b]]
        ap = [average_precision_score(yb[:, c], pb[:, c]) for c in range(2)]
        roc = [roc_auc_score(yb[:, c], pb[:, c]) for c in range(2)]
        np.testing.assert_allclose(stats[b], [np.mean(ap), np.mean(roc), *ap, *roc], atol=1e-12)


def test_undefined_classes_are_nan_and_macro_skips_them():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=float)
    p = np.array([[0.9, 0.1, 0.3], [0.2, 0.5, 0.6], [0.7, 0.3, 0.2], [0.4, 0.8, 0.9]])
    m = M.classification_metrics(y, p, ["A", "NOPOS", "ALLPOS"], bootstrap=200, seed=1)
    assert m["auroc"]["A"] == 1.0 and m["auprc"]["A"] == 1.0
    assert math.isnan(m["auroc"]["NOPOS"]) and math.isnan(m["auprc"]["NOPOS"])
    # every record positive: AUROC undefined (no negatives), AP = 1 (precision is always 1)
    assert math.isnan(m["auroc"]["ALLPOS"]) and m["auprc"]["ALLPOS"] == 1.0
    assert m["macro_auroc"] == 1.0 and m["macro_auprc"] == 1.0
    assert m["n_undefined"] == {"auprc": 1, "auroc": 2}
    assert m["positives"] == {"A": 2, "NOPOS": 0, "ALLPOS": 4} and m["n"] == 4
    assert all(math.isnan(v) for v in m["ci"]["auprc/NOPOS"])
    lo, hi = m["ci"]["auroc/A"]            # some resamples lack a class: CI from the rest, no crash
    assert lo == hi == 1.0


@pytest.mark.parametrize("y, p, match", [
    ([[0], [2]], [[0.1], [0.2]], "0/1"),
    ([[0], [1]], [[0.1], [np.nan]], "non-finite"),
    ([[0, 1], [1, 0]], [[0.1], [0.2]], "must both be"),
])
def test_classification_rejects_bad_input(y, p, match):
    with pytest.raises(ValueError, match=match):
        M.auroc_per_class(y, p)


def test_classification_names_must_match_columns():
    y, p = _toy_multilabel(20, 0, k=3)
    with pytest.raises(ValueError, match="2 class names for 3 columns"):
        M.classification_metrics(y, p, ["A", "B"])


# ----------------------------------------------------------------------- bootstrap

def _mean_stat(x):
    return x.mean(axis=1)


def test_bootstrap_is_one_vectorised_call_reproducible_and_calibrated():
    x = np.random.default_rng(0).normal(size=400)
    calls = []

    def stat(xb):
        calls.append(xb.shape)
        return xb.mean(axis=1)

    lo, hi = M.bootstrap_ci(stat, x, n=2000, seed=5)
    assert calls == [(2000, 400)]                       # one call on the whole resample matrix
    assert lo < x.mean() < hi
    # percentile CI of a mean ~ mean +- 1.96 sd/sqrt(n)
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.1)
    assert M.bootstrap_ci(_mean_stat, x, n=2000, seed=5) == (lo, hi)
    assert M.bootstrap_ci(_mean_stat, x, n=2000, seed=6) != (lo, hi)


def test_bootstrap_ci_shrinks_with_n():
    small_y, small_p = _toy_multilabel(100, 1, k=2)
    big_y, big_p = _toy_multilabel(900, 1, k=2)
    small = M.classification_metrics(small_y, small_p, ["A", "B"], bootstrap=1000)
    big = M.classification_metrics(big_y, big_p, ["A", "B"], bootstrap=1000)
    for key in ("macro_auprc", "macro_auroc", "auroc/A"):
        w_small = small["ci"][key][1] - small["ci"][key][0]
        w_big = big["ci"][key][1] - big["ci"][key][0]
        assert 0 < w_big < 0.5 * w_small, key              # ~1/3 expected for 9x the records


def test_classification_ci_covers_point_for_every_figure():
    y, p = _toy_multilabel(300, 4, k=len(RHYTHM_CODES), rate=0.1)
    m = M.classification_metrics(y, p, RHYTHM_CODES, bootstrap=1000, seed=2)
    assert len(m["ci"]) == 2 + 2 * len(RHYTHM_CODES)
    for key, (lo, hi) in m["ci"].items():
        point = m[key] if "/" not in key else m[key.split("/")[0]][key.split("/")[1]]
        assert lo <= point <= hi, key
        assert lo < hi, key


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch):
    y, p = _toy_multilabel(120, 8, k=2)
    whole = M.bootstrap_ci(M._classification_stats, y, p, n=300, seed=9)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 500)        # forces ~150 chunks
    chunked = M.bootstrap_ci(M._classification_stats, y, p, n=300, seed=9)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_bootstrap_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="array 1 has 3 samples"):
        M.bootstrap_ci(_mean_stat, np.zeros(4), np.zeros(3))


# ---------------------------------------------------------------- operating points

def test_f1_max_thresholds_separable_toy_case_is_exact():
    # every positive outscores every negative: F1 = 1 exactly at the lowest positive score
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=float)
    p = np.array([[0.9, 0.2], [0.3, 0.6], [0.7, 0.95], [0.1, 0.5], [0.8, 0.4]])
    np.testing.assert_array_equal(M.f1_max_thresholds(y, p), [0.7, 0.6])
    m = M.operating_point_metrics(y, p, M.f1_max_thresholds(y, p), ["A", "B"])
    assert m["f1"] == {"A": 1.0, "B": 1.0} and m["macro_f1"] == 1.0


def test_f1_max_thresholds_by_hand_with_ties():
    # cuts .9/.8/.7/.1 give F1 2/3, 1/2, 4/5, 2/3 -> .7
    assert M.f1_max_thresholds([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]).tolist() == [0.7]
    # cuts .9 and .6 both give F1 2/3: the higher threshold (fewer positives) wins
    assert M.f1_max_thresholds([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]).tolist() == [0.9]
    # tied scores are one cut: p >= .5 takes both records, so F1 there is 1/2 and .2 (4/5) wins
    assert M.f1_max_thresholds([1, 0, 1], [0.5, 0.5, 0.2]).tolist() == [0.2]


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_thresholds_match_brute_force_over_observed_scores(seed):
    y, p = _toy_multilabel(90, seed, k=3)
    got = M.f1_max_thresholds(y, p)
    for c in range(3):
        cands = np.unique(p[:, c])[::-1]                   # highest first: argmax keeps the tie rule
        f1s = [f1_score(y[:, c], p[:, c] >= t, zero_division=0.0) for t in cands]
        assert got[c] == cands[int(np.argmax(f1s))]


def test_class_without_positives_has_nan_threshold_and_nan_figures():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    p = np.array([[0.8, 0.1], [0.3, 0.9], [0.6, 0.4], [0.2, 0.5]])
    t = M.f1_max_thresholds(y, p)
    assert t[0] == 0.6 and math.isnan(t[1])
    m = M.operating_point_metrics(y, p, t, ["A", "NOPOS"], bootstrap=50)
    assert all(math.isnan(m[key]["NOPOS"]) for key in ("f1", "sensitivity", "specificity"))
    assert math.isnan(m["thresholds"]["NOPOS"]) and m["macro_f1"] == 1.0   # macro skips the undefined class
    assert all(math.isnan(v) for v in m["ci"]["f1/NOPOS"])


def test_operating_point_metrics_by_hand():
    y = np.array([[1, 1], [1, 1], [1, 1], [0, 1], [0, 1], [0, 1]], dtype=float)
    p = np.array([[0.9, 0.1], [0.7, 0.1], [0.2, 0.1], [0.8, 0.1], [0.1, 0.1], [0.3, 0.1]])
    m = M.operating_point_metrics(y, p, {"A": 0.5, "ALLPOS": 0.5}, ["A", "ALLPOS"])
    # A: predicted {0, 1, 3} -> TP 2, FP 1, FN 1, TN 2
    assert m["f1"]["A"] == pytest.approx(4 / 6)
    assert m["sensitivity"]["A"] == pytest.approx(2 / 3) and m["specificity"]["A"] == pytest.approx(2 / 3)
    # ALLPOS: no negatives -> specificity undefined; nothing predicted -> sensitivity 0, F1 0
    assert math.isnan(m["specificity"]["ALLPOS"])
    assert m["sensitivity"]["ALLPOS"] == 0.0 and m["f1"]["ALLPOS"] == 0.0
    assert m["macro_f1"] == pytest.approx(2 / 6) and m["n"] == 6
    assert m["thresholds"] == {"A": 0.5, "ALLPOS": 0.5} and "ci" not in m
    # no actual and no predicted positives: F1 and sensitivity undefined, specificity 1
    none = M.operating_point_metrics(np.zeros((3, 1)), np.full((3, 1), 0.2), [0.5], ["Z"])
    assert math.isnan(none["f1"]["Z"]) and math.isnan(none["sensitivity"]["Z"])
    assert none["specificity"]["Z"] == 1.0 and math.isnan(none["macro_f1"])


def test_operating_point_metrics_match_sklearn_per_resample():
    y, p = _toy_multilabel(70, 5, k=2)
    t = np.array([0.45, 0.6])
    idx = np.random.default_rng(1).integers(0, 70, size=(10, 70))
    stats = M._operating_stats(y[idx], p[idx], t)             # (10, 1 + 3k)
    for b in range(10):
        yb, pred = y[idx[b]], p[idx[b]] >= t
        f1 = [f1_score(yb[:, c], pred[:, c]) for c in range(2)]
        sens = [recall_score(yb[:, c], pred[:, c]) for c in range(2)]
        spec = [recall_score(1 - yb[:, c], ~pred[:, c]) for c in range(2)]
        np.testing.assert_allclose(stats[b], [np.mean(f1), *f1, *sens, *spec], atol=1e-12)


def test_operating_point_ci_brackets_every_point_value():
    y, p = _toy_multilabel(300, 6, k=3)
    names = ["A", "B", "C"]
    m = M.operating_point_metrics(y, p, M.f1_max_thresholds(y, p), names, bootstrap=500, seed=3)
    assert len(m["ci"]) == 1 + 3 * 3
    for key, (lo, hi) in m["ci"].items():
        point = m[key] if "/" not in key else m[key.split("/")[0]][key.split("/")[1]]
        assert lo <= point <= hi and lo < hi, key
    again = M.operating_point_metrics(y, p, M.f1_max_thresholds(y, p), names, bootstrap=500, seed=3)
    assert again["ci"] == m["ci"]


def test_operating_points_name_shapes_and_classes_on_bad_input():
    y, p = _toy_multilabel(10, 0, k=3)
    with pytest.raises(ValueError, match=r"\(10, 3\) and \(10, 2\)"):
        M.f1_max_thresholds(y, p[:, :2])
    with pytest.raises(ValueError, match=r"\(10, 3\) and \(9, 3\)"):
        M.operating_point_metrics(y, p[:9], [0.5] * 3, ["A", "B", "C"])
    with pytest.raises(ValueError, match=r"thresholds have shape \(2,\), expected \(3,\)"):
        M.operating_point_metrics(y, p, [0.5, 0.5], ["A", "B", "C"])
    with pytest.raises(ValueError, match="no threshold for class\\(es\\) C"):
        M.operating_point_metrics(y, p, {"A": 0.5, "B": 0.5}, ["A", "B", "C"])
    with pytest.raises(ValueError, match="2 class names for 3 columns"):
        M.operating_point_metrics(y, p, [0.5] * 3, ["A", "B"])


# ---------------------------------------------------------------------- regression

def test_regression_by_hand_and_vs_sklearn():
    y, yhat = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 6.0]
    m = M.regression_metrics(np.array(y)[:, None], np.array(yhat)[:, None])
    assert m["mae"] == pytest.approx(1.0)                  # |1,0,1,2| / 4
    assert m["r2"] == pytest.approx(1 - 6 / 5)             # SS_res 6, SS_tot 5
    assert m["n"] == 4
    rng = np.random.default_rng(2)
    a = rng.normal(60, 15, 500)
    b = a + rng.normal(0, 8, 500)
    m = M.regression_metrics(a, b, bootstrap=1000, seed=0)
    assert m["mae"] == pytest.approx(mean_absolute_error(a, b))
    assert m["r2"] == pytest.approx(r2_score(a, b))
    assert m["ci"]["mae"][0] < m["mae"] < m["ci"]["mae"][1]
    assert m["ci"]["r2"][0] < m["r2"] < m["ci"]["r2"][1]


def test_regression_constant_targets_give_nan_r2_and_nan_input_is_an_error():
    assert math.isnan(M.regression_metrics([5.0, 5.0, 5.0], [4.0, 5.0, 6.0])["r2"])
    with pytest.raises(ValueError, match="1 non-finite"):
        M.regression_metrics([50.0, np.nan], [50.0, 51.0])


# ------------------------------------------------------------------ reconstruction

def test_reconstruction_by_hand():
    n, t = 5, 200
    time = np.arange(t) / t
    # whole periods: mean(sin) = 0 and mean(sin^2) = 1/2 exactly for each record
    base = np.stack([np.sin(2 * np.pi * (r + 1) * time) for r in range(n)])
    y = np.stack([base, base, base], axis=1)                # (n, 3 leads, t)
    yhat = np.stack([2 * base + 1, -base, np.zeros_like(base)], axis=1)
    m = M.reconstruction_metrics(y, yhat, ["I", "II", "V1"], bootstrap=500)
    assert m["r"]["I"] == pytest.approx(1.0) and m["r"]["II"] == pytest.approx(-1.0)
    assert math.isnan(m["r"]["V1"]) and m["n_undefined_r"] == n     # constant prediction
    assert m["rmse"]["I"] == pytest.approx(math.sqrt(0.5 + 1))      # error = sin + 1
    assert m["rmse"]["II"] == pytest.approx(math.sqrt(4 * 0.5))     # error = -2 sin
    assert m["rmse"]["V1"] == pytest.approx(math.sqrt(0.5))
    assert m["mean_r"] == pytest.approx(0.0)                        # mean of 1 and -1
    assert m["mean_rmse"] == pytest.approx((math.sqrt(1.5) + math.sqrt(2) + math.sqrt(0.5)) / 3)
    assert m["ci"]["r/I"] == pytest.approx([1.0, 1.0])
    assert all(math.isnan(v) for v in m["ci"]["r/V1"])


def test_reconstruction_matches_scipy_pearson_per_record():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(30, len(LEADS), 100)).astype(np.float32)
    yhat = y + rng.normal(scale=0.8, size=y.shape).astype(np.float32)
    m = M.reconstruction_metrics(y, yhat, LEADS, bootstrap=1000, seed=1)
    for j, lead in enumerate(LEADS):
        want = np.mean([pearsonr(y[i, j], yhat[i, j])[0] for i in range(30)])
        assert m["r"][lead] == pytest.approx(want, abs=1e-6)
        lo, hi = m["ci"][f"r/{lead}"]
        assert lo < m["r"][lead] < hi
    assert m["ci"]["mean_r"][0] < m["mean_r"] < m["ci"]["mean_r"][1]


def test_reconstruction_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="2 lead names for 3 leads"):
        M.reconstruction_metrics(np.zeros((2, 3, 10)), np.zeros((2, 3, 10)), ["I", "II"])


# ------------------------------------------------------------------------- flatten

def test_flatten_metrics_keys_and_values():
    y, p = _toy_multilabel(60, 2, k=len(RHYTHM_CODES), rate=0.3)
    m = M.classification_metrics(y, p, RHYTHM_CODES, bootstrap=100)
    flat = M.flatten_metrics(m, "val/")
    assert flat["val/macro_auprc"] == m["macro_auprc"]
    assert flat["val/auprc/1AVB"] == m["auprc"]["1AVB"]
    assert flat["val/positives/AFIB"] == float(m["positives"]["AFIB"])
    assert flat["val/ci/macro_auprc/lo"] == m["ci"]["macro_auprc"][0]
    assert flat["val/ci/auroc/STACH/hi"] == m["ci"]["auroc/STACH"][1]
    assert all(type(v) is float for v in flat.values())
    # 2 macro + 2x6 per class + n + 6 positives + 2 undefined counts + 2x(2 + 12) CI ends
    assert len(flat) == 2 + 12 + 1 + 6 + 2 + 28
    assert M.flatten_metrics({"mae": 3}) == {"mae": 3.0}


def test_flatten_metrics_refuses_or_skips_non_numbers():
    m = {"mae": 1.0, "split": "test", "dropped_leads": ["I", "II"]}
    with pytest.raises(TypeError, match="'test/split'"):
        M.flatten_metrics(m, "test")
    assert M.flatten_metrics(m, "test", strict=False) == {"test/mae": 1.0}

"""Paired two-level bootstrap and the non-inferiority verdict, on hand-made arrays."""
from __future__ import annotations

import numpy as np
import pytest

from ecgsearch import stats
from ecgsearch.metrics import classification_metrics, regression_metrics


def _toy(n=400, k=3, seeds=3, noise=1.0, rng=None):
    rng = rng or np.random.default_rng(0)
    y = (rng.random((n, k)) < 0.3).astype(float)
    base = y + noise * rng.standard_normal((n, k))
    return y, base, rng


def test_model_against_itself_is_exactly_zero_with_zero_width_ci():
    y, base, rng = _toy()
    p = np.stack([base + 0.3 * rng.standard_normal(base.shape) for _ in range(3)])
    for combine in stats.COMBINES:
        iv = stats.paired_interval("macro_auroc", y, p, p, combine=combine, n_boot=200)
        assert iv.value == 0.0 and iv.ci == (0.0, 0.0) and iv.ci_records == (0.0, 0.0)
        assert iv.per_seed == [0.0, 0.0, 0.0]


def test_single_arm_value_matches_metrics_module():
    y, base, _ = _toy()
    iv = stats.paired_interval("macro_auroc", y, base[None], n_boot=300)
    ref = classification_metrics(y, base, ["a", "b", "c"], bootstrap=300)
    assert iv.value == pytest.approx(ref["macro_auroc"], abs=1e-12)
    assert iv.ci[0] <= iv.value <= iv.ci[1]
    # one seed: no training variance, the two intervals coincide
    assert iv.ci == iv.ci_records and not iv.training_variance
    ages = np.linspace(20, 80, 50)
    pred = ages + np.random.default_rng(1).normal(0, 5, 50)
    mae = stats.paired_interval("mae", ages, pred[:, None], n_boot=100)
    assert mae.value == pytest.approx(regression_metrics(ages, pred)["mae"])


def test_paired_ci_is_narrower_than_independent_resamples():
    """Correlated arms: the paired CI of the difference is far narrower than the one you get
    by resampling each arm's records independently (which ignores what they share)."""
    y, base, rng = _toy(n=300, k=2, noise=1.5)
    pa = base + 0.1 * rng.standard_normal(base.shape)
    pb = base + 0.1 * rng.standard_normal(base.shape)
    paired = stats.paired_interval("macro_auroc", y, pa[None], pb[None], n_boot=500, seed=3)
    ia = stats.paired_interval("macro_auroc", y, pa[None], n_boot=500, seed=3)
    ib = stats.paired_interval("macro_auroc", y, pb[None], n_boot=500, seed=4)   # independent draws
    # CI of a difference of independent estimates: half-widths add in quadrature
    indep_half = np.hypot((ia.ci[1] - ia.ci[0]) / 2, (ib.ci[1] - ib.ci[0]) / 2)
    paired_half = (paired.ci[1] - paired.ci[0]) / 2
    assert paired_half < 0.5 * indep_half


def test_training_variance_widens_the_interval():
    """Seeds that disagree: the two-level CI is wider than the records-only one, and the
    between-seed SD is reported; identical seeds give identical intervals."""
    y, base, rng = _toy(n=300, k=2, noise=1.0)
    shifts = [0.0, 0.8, 1.6]
    pa = np.stack([base + s * rng.standard_normal(base.shape) for s in shifts])
    pb = np.stack([base] * 3)
    iv = stats.paired_interval("macro_auroc", y, pa, pb, combine="mean", n_boot=400)
    assert iv.seed_sd > 0 and iv.training_variance
    assert (iv.ci[1] - iv.ci[0]) > (iv.ci_records[1] - iv.ci_records[0])
    same = stats.paired_interval("macro_auroc", y, np.stack([pa[1]] * 3), pb, combine="mean", n_boot=400)
    assert same.seed_sd == 0.0
    assert same.ci == pytest.approx(same.ci_records)


def test_verdict_flips_at_the_margin():
    def iv(value, lo, hi):
        return stats.Interval(value, (lo, hi), (lo, hi), [value], float("nan"), 1, 100, 100, "ensemble")

    m = 0.01
    assert stats.noninferiority(iv(-0.002, -0.009, 0.004), m, "max")["verdict"] == "non-inferior"
    assert stats.noninferiority(iv(-0.002, -0.011, 0.004), m, "max")["verdict"] == "inconclusive"
    assert stats.noninferiority(iv(-0.03, -0.04, -0.012), m, "max")["verdict"] == "inferior"
    # lower is better (MAE): +0.4 years worse with CI up to 0.49 is non-inferior at 0.5
    assert stats.noninferiority(iv(0.4, 0.3, 0.49), 0.5, "min")["noninferior"]
    assert stats.noninferiority(iv(0.4, 0.3, 0.51), 0.5, "min")["verdict"] == "inconclusive"
    assert stats.noninferiority(iv(0.9, 0.6, 1.2), 0.5, "min")["verdict"] == "inferior"
    with pytest.raises(ValueError, match="margin"):
        stats.noninferiority(iv(0, 0, 0), 0.0, "max")


def test_identical_candidates_are_not_decisive():
    y, base, _ = _toy()
    same = stats.paired_interval("macro_auprc", y, base[None], base[None], combine="mean", n_boot=100)
    assert not stats.decisive(stats.oriented(same, "max")[1])
    better = stats.paired_interval("macro_auprc", y, (3 * y + base)[None], base[None], combine="mean", n_boot=200)
    assert stats.decisive(stats.oriented(better, "max")[1])
    # for MAE the orientation flips: a lower error is the better arm
    ages = np.linspace(20, 80, 200)
    good, bad = ages + 1.0, ages + np.where(np.arange(200) % 2, 8.0, -8.0)
    d = stats.paired_interval("mae", ages, good[None, :, None], bad[None, :, None], combine="mean", n_boot=200)
    assert d.value < 0 and stats.decisive(stats.oriented(d, "min")[1])


def test_shape_errors_name_the_shapes():
    y, base, _ = _toy(n=50)
    with pytest.raises(ValueError, match=r"\(seeds, n, k\)"):
        stats.paired_interval("macro_auroc", y, base[:10][None])
    with pytest.raises(ValueError, match="same"):
        stats.paired_interval("macro_auroc", y, np.stack([base, base]), base[None])
    with pytest.raises(ValueError, match="known"):
        stats.paired_interval("accuracy", y, base[None])


@pytest.mark.parametrize("metric", ["macro_auroc", "macro_auprc", "mae", "r2"])
def test_weighted_replicates_equal_resampling_and_sorting(metric):
    """The bootstrap's count-weighted statistics equal the statistic of the resampled records
    (duplicates are ties with themselves), tied scores included."""
    rng = np.random.default_rng(5)
    n = 120
    if metric in ("mae", "r2"):
        y = rng.uniform(20, 90, (n, 1))
        p = np.round(y + rng.normal(0, 8, (n, 1)))
    else:
        y = (rng.random((n, 4)) < 0.25).astype(float)
        p = np.round(y + rng.standard_normal((n, 4)), 1)       # many ties
    idx = rng.integers(0, n, size=(20, n))
    counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    fast = stats._weighted(metric, y, p, counts)
    slow = stats.stat_for(metric)(y[idx], p[idx])
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)

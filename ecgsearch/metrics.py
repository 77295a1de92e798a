"""Evaluation metrics as pure numpy functions, with vectorised bootstrap CIs.

Every statistic here is written once, for a *batch* of resamples (a leading axis
B), and the point estimate is the same code with B = 1. That keeps the point
estimate and its confidence interval consistent by construction, and lets a
1,000-resample bootstrap run as a few array operations instead of 1,000 calls
into scikit-learn. The tests check the batched formulas against scikit-learn.

Undefined values are NaN, never an exception or a warning:
- AUROC of a class with no positives or no negatives, AUPRC of a class with no
  positives (in the data or in one bootstrap resample);
- Pearson r of a record-lead whose target or prediction is constant;
- R2 when all targets are equal.
- sensitivity at a threshold with no positives, specificity with no negatives, F1
  with no predicted and no actual positives, and every operating-point figure of a
  class whose threshold is NaN (it had no validation positives).
Macro means average the defined classes only and the dicts report how many were
undefined. A bootstrap CI is taken over the resamples where the statistic is
defined (conditioning on, e.g., "the resample holds a positive"); it is NaN only
when no resample is defined.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Bound on elements per resample chunk handed to a stat function (~32 MB of float64):
# the index matrix is drawn once, but materialising arrays[idx] for 1,000 resamples of a
# whole test fold at once would cost hundreds of MB.
_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------- helpers

def _nanmean(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the finite entries and their count; NaN (no warning) where none are finite."""
    ok = np.isfinite(x)
    cnt = ok.sum(axis=axis)
    tot = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return mean, cnt


def _check_finite(name: str, a: np.ndarray) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN/inf) out of {a.size}; "
                         "remove or mask those samples first")


def _as_2d_pair(y, p, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], (p[:, None] if p.ndim == 1 else p)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"{what}: labels and scores must both be (n, k); got {y.shape} and {p.shape}")
    _check_finite(f"{what} scores", p)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{what}: labels must be 0/1; found values such as "
                         f"{np.unique(y[~np.isin(y, (0.0, 1.0))])[:5].tolist()}")
    return y, p


# ----------------------------------------------------------------- batched statistics

def _sorted_rows(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each row of (B, n) by descending score; return sorted labels and, for every
    position, the first and last position of its tie group (a tie group is one threshold).
    """
    b, n = y.shape
    order = np.argsort(-p, axis=1, kind="stable")
    ys = np.take_along_axis(y, order, axis=1)
    ps = np.take_along_axis(p, order, axis=1)
    brk = ps[:, :-1] != ps[:, 1:]            # a new group starts after position i
    end = np.ones((b, n), dtype=bool)
    end[:, :-1] = brk
    start = np.ones((b, n), dtype=bool)
    start[:, 1:] = brk
    ar = np.arange(n)
    # forward running max of start positions / reverse running min of end positions
    g_start = np.maximum.accumulate(np.where(start, ar, 0), axis=1)
    g_end = np.minimum.accumulate(np.where(end, ar, n)[:, ::-1], axis=1)[:, ::-1]
    return ys, g_start, g_end


def _rank_stats_rows(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision per row of (B, n) labels/scores, from one sort.

    AUROC: each positive scores the negatives ranked strictly below it plus half the
    negatives tied with it (Mann-Whitney U / (P N)).
    AP, as scikit-learn defines it, sum_t (R_t - R_{t-1}) P_t: every positive in a tie
    group contributes the precision at the group's last position.
    """
    n = y.shape[1]
    ys, g_start, g_end = _sorted_rows(y, p)
    cpos = np.cumsum(ys, axis=1)
    cneg = np.arange(1, n + 1) - cpos
    npos = cpos[:, -1]
    nneg = n - npos
    neg_to_end = np.take_along_axis(cneg, g_end, axis=1)
    neg_before = np.take_along_axis(cneg, g_start, axis=1) - (1.0 - np.take_along_axis(ys, g_start, axis=1))
    # negatives strictly below = nneg - neg_to_end; tied negatives = neg_to_end - neg_before
    wins = (nneg[:, None] - neg_to_end) + 0.5 * (neg_to_end - neg_before)
    prec_at_end = np.take_along_axis(cpos, g_end, axis=1) / (g_end + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.where((npos > 0) & (nneg > 0), (ys * wins).sum(axis=1) / (npos * nneg), np.nan)
        ap = np.where(npos > 0, (ys * prec_at_end).sum(axis=1) / npos, np.nan)
    return auroc, ap


def _per_class(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP for every class of (B, n, k) arrays -> two (B, k) arrays."""
    pairs = [_rank_stats_rows(y[:, :, c], p[:, :, c]) for c in range(y.shape[2])]
    return np.stack([a for a, _ in pairs], axis=1), np.stack([b for _, b in pairs], axis=1)


# ------------------------------------------------------------------------- bootstrap

def bootstrap_ci(stat_fn: Callable[..., np.ndarray], *arrays, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05):
    """Percentile bootstrap CI of stat_fn over the samples (first axis) of `arrays`.

    stat_fn must be vectorised: it receives every array resampled with a leading
    resample axis (B, n_samples, ...) and returns (B,) or (B, m). One (n, n_samples)
    index matrix is drawn from `seed`, so the result does not depend on how the
    resamples are chunked. Returns (lo, hi): floats for a scalar statistic, (m,)
    arrays for a vector one. Resamples where the statistic is NaN are left out.
    """
    if n < 1:
        raise ValueError(f"bootstrap n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    arrays = tuple(np.asarray(a) for a in arrays)
    n_samples = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape[0] != n_samples:
            raise ValueError(f"bootstrap_ci: array {i} has {a.shape[0]} samples, array 0 has {n_samples}")
    if n_samples == 0:
        raise ValueError("bootstrap_ci: no samples to resample")
    idx = np.random.default_rng(seed).integers(0, n_samples, size=(n, n_samples))
    per_resample = max(sum(a.size for a in arrays), 1)
    step = max(1, _CHUNK_ELEMENTS // per_resample)
    parts = [np.asarray(stat_fn(*(a[idx[s:s + step]] for a in arrays)), dtype=np.float64)
             for s in range(0, n, step)]
    stats = np.concatenate(parts, axis=0)
    if stats.shape[0] != n:
        raise ValueError(f"stat_fn must return one value per resample (leading axis {n}); got shape {stats.shape}")
    scalar = stats.ndim == 1
    stats = stats.reshape(n, -1)
    lo = np.full(stats.shape[1], np.nan)
    hi = np.full(stats.shape[1], np.nan)
    for j in range(stats.shape[1]):
        col = stats[:, j][np.isfinite(stats[:, j])]
        if col.size:
            lo[j], hi[j] = np.quantile(col, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo[0]), float(hi[0])) if scalar else (lo, hi)


# ---------------------------------------------------------------- classification

def auroc_per_class(y, p) -> np.ndarray:
    """AUROC of each column of (n, k) 0/1 labels vs scores; NaN where a class lacks positives or negatives."""
    y, p = _as_2d_pair(y, p, "auroc_per_class")
    return _per_class(y[None], p[None])[0][0]


def auprc_per_class(y, p) -> np.ndarray:
    """Average precision of each column; NaN where a class has no positives."""
    y, p = _as_2d_pair(y, p, "auprc_per_class")
    return _per_class(y[None], p[None])[1][0]


def _classification_stats(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(B, n, k) -> (B, 2 + 2k): macro AUPRC, macro AUROC, AUPRC per class, AUROC per class."""
    roc, ap = _per_class(y, p)
    return np.concatenate([_nanmean(ap, 1)[0][:, None], _nanmean(roc, 1)[0][:, None], ap, roc], axis=1)


def classification_metrics(y, p, names: Sequence[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Per-class and macro AUROC/AUPRC of multi-label probabilities, optionally with 95% CIs."""
    y, p = _as_2d_pair(y, p, "classification_metrics")
    names = list(names)
    if len(names) != y.shape[1]:
        raise ValueError(f"classification_metrics: {len(names)} class names for {y.shape[1]} columns")
    if y.shape[0] == 0:
        raise ValueError("classification_metrics: no samples")
    k = len(names)
    point = _classification_stats(y[None], p[None])[0]
    ap, roc = point[2:2 + k], point[2 + k:]
    out = {
        "macro_auprc": float(point[0]), "macro_auroc": float(point[1]),
        "auprc": {c: float(v) for c, v in zip(names, ap)},
        "auroc": {c: float(v) for c, v in zip(names, roc)},
        "n": int(y.shape[0]),
        "positives": {c: int(v) for c, v in zip(names, y.sum(axis=0))},
        "n_undefined": {"auprc": int(np.isnan(ap).sum()), "auroc": int(np.isnan(roc).sum())},
    }
    if bootstrap > 0:
        lo, hi = bootstrap_ci(_classification_stats, y, p, n=bootstrap, seed=seed)
        keys = ["macro_auprc", "macro_auroc"] + [f"auprc/{c}" for c in names] + [f"auroc/{c}" for c in names]
        out["ci"] = {key: [float(a), float(b)] for key, a, b in zip(keys, lo, hi)}
    return out


# --------------------------------------------------------------- operating points

def f1_max_thresholds(y, p) -> np.ndarray:
    """Per-class score threshold maximising F1, for labels y and scores p, both (n, k).

    Meant for the VALIDATION fold; apply the result to the test fold with
    `operating_point_metrics`. A record is predicted positive when p >= threshold, so
    every candidate threshold is one of the observed scores (a tie group is one
    candidate). Ties in F1 go to the highest threshold among the maximisers, i.e. the
    fewest predicted positives. A class with no positives has no F1 maximiser: its
    threshold is NaN, and `operating_point_metrics` reports that class as undefined.
    """
    y, p = _as_2d_pair(y, p, "f1_max_thresholds")
    if y.shape[0] == 0:
        raise ValueError("f1_max_thresholds: no samples")
    n = y.shape[0]
    # one row per class: the sort-based helper works on (rows, n)
    ys, _, g_end = _sorted_rows(y.T, p.T)
    ps = -np.sort(-p.T, axis=1, kind="stable")
    tp = np.cumsum(ys, axis=1)               # true positives when the cut is at this position
    npos = tp[:, -1]
    predicted = np.arange(1, n + 1)
    # Only a tie group's last position is a real cut (p >= t takes the whole group).
    # TP and the denominator are exact integers, so equal F1 values compare equal and
    # argmax (first maximum, i.e. highest score) implements the documented tie rule.
    f1 = np.where(g_end == np.arange(n), 2.0 * tp / (npos[:, None] + predicted), -np.inf)
    best = np.argmax(f1, axis=1)
    t = ps[np.arange(y.shape[1]), best]
    return np.where(npos > 0, t, np.nan)


def _operating_stats(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(B, n, k) labels/scores at thresholds t (k,) -> (B, 1 + 3k): macro F1, F1, sensitivity, specificity."""
    pred = p >= t                             # NaN threshold: nothing predicted (masked below)
    pos = y > 0.5
    tp = (pred & pos).sum(axis=1).astype(np.float64)
    fp = (pred & ~pos).sum(axis=1).astype(np.float64)
    fn = (~pred & pos).sum(axis=1).astype(np.float64)
    tn = (~pred & ~pos).sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    undefined = np.isnan(t)[None, :]
    f1, sens, spec = (np.where(undefined, np.nan, a) for a in (f1, sens, spec))
    return np.concatenate([_nanmean(f1, 1)[0][:, None], f1, sens, spec], axis=1)


def _threshold_vector(thresholds, names: list[str], k: int) -> np.ndarray:
    if isinstance(thresholds, Mapping):
        missing = [c for c in names if c not in thresholds]
        if missing:
            raise ValueError(f"operating_point_metrics: no threshold for class(es) {', '.join(missing)}; "
                             f"thresholds cover {', '.join(map(str, thresholds)) or 'nothing'}")
        thresholds = [thresholds[c] for c in names]
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (k,):
        raise ValueError(f"operating_point_metrics: thresholds have shape {t.shape}, "
                         f"expected ({k},) for scores with {k} classes")
    return t


def operating_point_metrics(y, p, thresholds, names: Sequence[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """F1, sensitivity and specificity per class at fixed thresholds (normally on the TEST fold).

    `thresholds` is a (k,) sequence or a {class: threshold} mapping, chosen elsewhere (on
    the validation fold, e.g. by `f1_max_thresholds`); a NaN threshold makes that class
    undefined (NaN) and leaves it out of macro_f1. The bootstrap resamples records and keeps
    the thresholds fixed: the CI covers test-fold sampling, not threshold selection.
    """
    y, p = _as_2d_pair(y, p, "operating_point_metrics")
    names = list(names)
    if len(names) != y.shape[1]:
        raise ValueError(f"operating_point_metrics: {len(names)} class names for {y.shape[1]} columns")
    if y.shape[0] == 0:
        raise ValueError("operating_point_metrics: no samples")
    k = len(names)
    t = _threshold_vector(thresholds, names, k)

    def stat(yb: np.ndarray, pb: np.ndarray) -> np.ndarray:
        return _operating_stats(yb, pb, t)

    point = stat(y[None], p[None])[0]
    f1, sens, spec = point[1:1 + k], point[1 + k:1 + 2 * k], point[1 + 2 * k:]
    out = {
        "thresholds": {c: float(v) for c, v in zip(names, t)},
        "f1": {c: float(v) for c, v in zip(names, f1)},
        "sensitivity": {c: float(v) for c, v in zip(names, sens)},
        "specificity": {c: float(v) for c, v in zip(names, spec)},
        "macro_f1": float(point[0]),
        "n": int(y.shape[0]),
        "positives": {c: int(v) for c, v in zip(names, y.sum(axis=0))},
    }
    if bootstrap > 0:
        lo, hi = bootstrap_ci(stat, y, p, n=bootstrap, seed=seed)
        keys = (["macro_f1"] + [f"f1/{c}" for c in names] + [f"sensitivity/{c}" for c in names]
                + [f"specificity/{c}" for c in names])
        out["ci"] = {key: [float(a), float(b)] for key, a, b in zip(keys, lo, hi)}
    return out


# -------------------------------------------------------------------- regression

def _regression_stats(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """(B, n) -> (B, 2): MAE and R2 (NaN when the targets have zero variance)."""
    err = yhat - y
    mae = np.abs(err).mean(axis=1)
    ss_res = (err ** 2).sum(axis=1)
    ss_tot = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)
    return np.stack([mae, r2], axis=1)


def regression_metrics(y, yhat, bootstrap: int = 0, seed: int = 0) -> dict:
    """MAE and R2 of a single regression target ((n,) or (n, 1)), optionally with 95% CIs."""
    arrs = []
    for name, a in (("targets", y), ("predictions", yhat)):
        a = np.asarray(a, dtype=np.float64)
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1:
            raise ValueError(f"regression_metrics: {name} must be (n,) or (n, 1), got {a.shape}")
        _check_finite(f"regression_metrics {name}", a)
        arrs.append(a)
    y, yhat = arrs
    if y.shape != yhat.shape or y.size == 0:
        raise ValueError(f"regression_metrics: need equal, non-empty lengths; got {y.shape} and {yhat.shape}")
    mae, r2 = _regression_stats(y[None], yhat[None])[0]
    out = {"mae": float(mae), "r2": float(r2), "n": int(y.size)}
    if bootstrap > 0:
        lo, hi = bootstrap_ci(_regression_stats, y, yhat, n=bootstrap, seed=seed)
        out["ci"] = {"mae": [float(lo[0]), float(hi[0])], "r2": [float(lo[1]), float(hi[1])]}
    return out


# ---------------------------------------------------------------- reconstruction

def _record_lead_stats(y: np.ndarray, yhat: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and RMSE over time for every record and lead: two (n, n_leads) arrays.

    Done in record chunks in float64 so a whole test fold never needs several
    full-size float64 temporaries at once.
    """
    n = y.shape[0]
    r = np.empty(y.shape[:2])
    rmse = np.empty(y.shape[:2])
    for s in range(0, n, chunk):
        a = y[s:s + chunk].astype(np.float64)
        b = yhat[s:s + chunk].astype(np.float64)
        rmse[s:s + chunk] = np.sqrt(((b - a) ** 2).mean(axis=2))
        a = a - a.mean(axis=2, keepdims=True)
        b = b - b.mean(axis=2, keepdims=True)
        den = np.sqrt((a * a).sum(axis=2) * (b * b).sum(axis=2))
        with np.errstate(invalid="ignore", divide="ignore"):
            r[s:s + chunk] = np.where(den > 0, (a * b).sum(axis=2) / den, np.nan)
    return r, rmse


def _reconstruction_stats(r: np.ndarray, rmse: np.ndarray) -> np.ndarray:
    """(B, n, L) per-record values -> (B, 2 + 2L): mean r, mean RMSE, r per lead, RMSE per lead."""
    r_lead = _nanmean(r, 1)[0]
    rmse_lead = rmse.mean(axis=1)
    return np.concatenate([_nanmean(r_lead, 1)[0][:, None], rmse_lead.mean(axis=1)[:, None],
                           r_lead, rmse_lead], axis=1)


def reconstruction_metrics(y, yhat, lead_names: Sequence[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Per-lead Pearson r and RMSE (mV) of reconstructed signals y, yhat (n, n_leads, T).

    Both are computed per record and lead over time, then averaged over records
    (r over the records where it is defined; "n_undefined_r" counts the others, e.g.
    a flat lead). mean_r / mean_rmse average the per-lead values. The bootstrap
    resamples records.
    """
    y = np.asarray(y)
    yhat = np.asarray(yhat)
    lead_names = list(lead_names)
    if y.ndim != 3 or y.shape != yhat.shape:
        raise ValueError(f"reconstruction_metrics: signals must both be (n, n_leads, T); got {y.shape} and {yhat.shape}")
    if len(lead_names) != y.shape[1]:
        raise ValueError(f"reconstruction_metrics: {len(lead_names)} lead names for {y.shape[1]} leads")
    if y.shape[0] == 0 or y.shape[2] < 2:
        raise ValueError(f"reconstruction_metrics: need records with at least 2 samples; got shape {y.shape}")
    _check_finite("reconstruction_metrics targets", y)
    _check_finite("reconstruction_metrics predictions", yhat)
    r, rmse = _record_lead_stats(y, yhat)
    k = len(lead_names)
    point = _reconstruction_stats(r[None], rmse[None])[0]
    out = {
        "mean_r": float(point[0]), "mean_rmse": float(point[1]),
        "r": {ld: float(v) for ld, v in zip(lead_names, point[2:2 + k])},
        "rmse": {ld: float(v) for ld, v in zip(lead_names, point[2 + k:])},
        "n": int(y.shape[0]),
        "n_undefined_r": int(np.isnan(r).sum()),
    }
    if bootstrap > 0:
        lo, hi = bootstrap_ci(_reconstruction_stats, r, rmse, n=bootstrap, seed=seed)
        keys = ["mean_r", "mean_rmse"] + [f"r/{ld}" for ld in lead_names] + [f"rmse/{ld}" for ld in lead_names]
        out["ci"] = {key: [float(a), float(b)] for key, a, b in zip(keys, lo, hi)}
    return out


# ------------------------------------------------------------------------ logging

def flatten_metrics(m: Mapping, prefix: str = "", strict: bool = True) -> dict[str, float]:
    """Flatten a metrics dict to "prefix/key/sub" -> float (for MLflow and Ray reports).

    A [lo, hi] pair becomes ".../lo" and ".../hi"; ints become floats. With strict=True
    (default) any other value is an error, so nothing is silently left out; strict=False
    skips non-numeric annotations such as evaluate()'s "split" or "dropped_leads".
    """
    out: dict[str, float] = {}

    def walk(obj, key: str) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif (isinstance(obj, (list, tuple)) and len(obj) == 2
              and all(_is_number(v) for v in obj)):
            walk(obj[0], f"{key}/lo")
            walk(obj[1], f"{key}/hi")
        elif _is_number(obj):
            out[key] = float(obj)
        elif strict:
            raise TypeError(f"flatten_metrics: value at {key!r} is {type(obj).__name__}, not a number, "
                            "dict or [lo, hi] pair (pass strict=False to skip such annotations)")

    walk(m, prefix.rstrip("/"))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

"""Paired comparisons of lead sets whose intervals include training variance.

A lead-search figure has two sources of uncertainty: which records the fold holds (test
sampling) and which training run produced the model (seed, batch order, lead dropout).
On small ECG studies the second often dominates, and a percentile bootstrap over records
alone hides it. Here every model is trained with R seeds and every interval comes from a
*two-level* bootstrap: each replicate draws R seeds with replacement and the records with
replacement, and recomputes the statistic on that draw. Both arms of a comparison use the
same drawn records and the same drawn seed indices (seed r of arm a was trained with the
same seed as seed r of arm b: common random numbers), which is what makes it *paired*:
what the two arms share cancels, and the interval measures only how they differ.

Two ways to combine the R seeds:
- "mean": the statistic of each seed's model, averaged (the expected value of *one*
  training; the RLE's step scores);
- "ensemble": the statistic of the seeds' mean output (the model a user would deploy
  from R trainings; test-fold figures).

Everything here is pure numpy on prediction arrays, tested on hand-made arrays.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ecgsearch.metrics import _nanmean, _per_class, _regression_stats

Stat = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (B, n, k) labels, (B, n, k) preds -> (B,)
COMBINES = ("mean", "ensemble")


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _nanmean(_per_class(y, p)[0], 1)[0]


def _macro_auprc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _nanmean(_per_class(y, p)[1], 1)[0]


def _mae(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _regression_stats(y[..., 0], p[..., 0])[:, 0]


def _r2(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _regression_stats(y[..., 0], p[..., 0])[:, 1]


# ----------------------------------------------------- weighted forms, for the bootstrap
# A bootstrap replicate is the original records with multiplicities (the resample counts), and a
# record drawn twice is a tie with itself. So every replicate's statistic can be computed from the
# records sorted ONCE by score, with cumulative sums of the counts: O(B n) per class instead of a
# sort of every replicate. Results equal the resample-and-sort computation exactly.

def _sorted_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descending order of one score column and, per sorted position, its tie group's first/last position."""
    order = np.argsort(-score, kind="stable")
    ss = score[order]
    n = ss.size
    brk = ss[:-1] != ss[1:]
    start = np.ones(n, dtype=bool)
    start[1:] = brk
    end = np.ones(n, dtype=bool)
    end[:-1] = brk
    ar = np.arange(n)
    g_start = np.maximum.accumulate(np.where(start, ar, 0))
    g_end = np.minimum.accumulate(np.where(end, ar, n)[::-1])[::-1]
    return order, g_start, g_end


def _weighted_rank_stats(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of one class for each row of counts w (B, n): two (B,) arrays."""
    order, g_start, g_end = _sorted_groups(score)
    ys = y[order]
    cw = w[:, order]
    pw, nw = cw * ys, cw * (1.0 - ys)
    cpos, cneg = np.cumsum(pw, axis=1), np.cumsum(nw, axis=1)
    wpos, wneg = cpos[:, -1], cneg[:, -1]
    neg_to_end = cneg[:, g_end]
    neg_before = cneg[:, g_start] - nw[:, g_start]
    wins = (wneg[:, None] - neg_to_end) + 0.5 * (neg_to_end - neg_before)
    tot_end = cpos[:, g_end] + cneg[:, g_end]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tot_end > 0, cpos[:, g_end] / tot_end, 0.0)
        auroc = np.where((wpos > 0) & (wneg > 0), (pw * wins).sum(axis=1) / (wpos * wneg), np.nan)
        ap = np.where(wpos > 0, (pw * prec).sum(axis=1) / wpos, np.nan)
    return auroc, ap


def _weighted(metric: str, y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Statistic of labels y (n, k) and scores p (n, k) under each row of record counts w (B, n)."""
    if metric in ("macro_auroc", "macro_auprc"):
        j = 0 if metric == "macro_auroc" else 1
        per = np.stack([_weighted_rank_stats(y[:, c], p[:, c], w)[j] for c in range(y.shape[1])], axis=1)
        return _nanmean(per, 1)[0]
    err = p[:, 0] - y[:, 0]
    tot = w.sum(axis=1)
    if metric == "mae":
        return (w * np.abs(err)).sum(axis=1) / tot
    ybar = (w * y[:, 0]).sum(axis=1) / tot
    ss_res = (w * err ** 2).sum(axis=1)
    ss_tot = (w * (y[:, 0][None, :] - ybar[:, None]) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


STATS: dict[str, Stat] = {"macro_auroc": _macro_auroc, "macro_auprc": _macro_auprc, "mae": _mae, "r2": _r2}
# Which direction is better, per metric.
MODES = {"macro_auroc": "max", "macro_auprc": "max", "mae": "min", "r2": "max"}


def stat_for(metric: str) -> Stat:
    if metric not in STATS:
        raise ValueError(f"no paired statistic for metric {metric!r}; known: {', '.join(STATS)}")
    return STATS[metric]


@dataclass
class Interval:
    """A statistic (one arm, or the difference a - b of two arms) with its intervals."""
    value: float                    # on every record and every seed
    ci: tuple[float, float]         # two-level: seeds and records resampled (what bounds it)
    ci_records: tuple[float, float]  # records only, the R seeds held fixed (test sampling alone)
    per_seed: list[float]           # the statistic of each seed's model alone
    seed_sd: float                  # between-seed SD of per_seed (NaN for R = 1)
    n_seeds: int
    n_records: int
    n_boot: int
    combine: str
    training_variance: bool = field(init=False)  # False when R = 1: the CI covers test sampling only

    def __post_init__(self) -> None:
        self.training_variance = self.n_seeds > 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"], d["ci_records"] = list(self.ci), list(self.ci_records)
        return d


def _as_arrays(y, preds) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim == 2:  # one seed
        p = p[None]
    if p.ndim != 3 or p.shape[1:] != y.shape:
        raise ValueError(f"predictions must be (seeds, n, k) matching labels (n, k); got {p.shape} and {y.shape}")
    if not np.isfinite(p).all():
        raise ValueError("predictions hold non-finite values (NaN/inf)")
    if y.shape[0] < 2:
        raise ValueError(f"need at least 2 records to compare, got {y.shape[0]}")
    return y, p


def _combine(stat: Stat, y: np.ndarray, p: np.ndarray, combine: str) -> np.ndarray:
    """Statistic of (B, n, k) labels and (B, R, n, k) predictions -> (B,)."""
    b, r = p.shape[:2]
    if combine == "ensemble":
        return stat(y, p.mean(axis=1))
    per = stat(np.repeat(y, r, axis=0), p.reshape(b * r, *p.shape[2:])).reshape(b, r)
    return _nanmean(per, 1)[0]


def _quantiles(x: np.ndarray, alpha: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not x.size:
        return (math.nan, math.nan)
    lo, hi = np.quantile(x, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def paired_interval(metric: str, y, pa, pb=None, *, combine: str = "ensemble", n_boot: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> Interval:
    """The statistic of arm a (pb None) or the difference a - b, with two-level and records-only CIs.

    y: (n,) or (n, k) labels; pa, pb: (R, n, k) (or (n, k) for one seed) predictions of the same
    records. pa[r] and pb[r] must come from trainings with the same seed. Resamples where the
    statistic is undefined (a class without positives in the draw) are left out.
    """
    if combine not in COMBINES:
        raise ValueError(f"invalid combine={combine!r}: choose mean or ensemble")
    if n_boot < 1:
        raise ValueError(f"bootstrap n must be >= 1, got {n_boot}")
    stat_for(metric)   # unknown metric -> error before any work
    y, pa = _as_arrays(y, pa)
    arms = [pa]
    if pb is not None:
        _, pb = _as_arrays(y, pb)
        if pb.shape != pa.shape:
            raise ValueError(f"the two arms must have the same (seeds, n, k); got {pa.shape} and {pb.shape}")
        arms.append(pb)
    r, n = pa.shape[0], pa.shape[1]

    stat = stat_for(metric)

    def value(yy: np.ndarray, sel: list[np.ndarray]) -> np.ndarray:
        out = _combine(stat, yy, sel[0], combine)
        return out - _combine(stat, yy, sel[1], combine) if len(sel) == 2 else out

    point = float(value(y[None], [a[None] for a in arms])[0])
    per_seed = [float(value(y[None], [a[None, i:i + 1] for a in arms])[0]) for i in range(r)]
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, n, size=(n_boot, n))
    seeds = rng.integers(0, r, size=(n_boot, r)) if r > 1 else np.zeros((n_boot, 1), dtype=int)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), rec.ravel()), 1.0)
    rec_vals, two_vals = _replicates(metric, y, arms, counts, seeds if r > 1 else None, combine)
    out = {"records": _quantiles(rec_vals, alpha), "two_level": _quantiles(two_vals, alpha)}
    sd = float(np.std(per_seed, ddof=1)) if r > 1 else math.nan
    return Interval(point, out["two_level"], out["records"], per_seed, sd, r, n, int(n_boot), combine)


def _replicates(metric: str, y: np.ndarray, arms: list[np.ndarray], counts: np.ndarray,
                seeds: np.ndarray | None, combine: str) -> tuple[np.ndarray, np.ndarray]:
    """(records-only, two-level) (B,) replicates of arm a (minus arm b).

    Replicate b uses the record counts counts[b] and, for the two-level figure, the seed
    indices seeds[b] for both arms (paired); seeds None (R = 1): both figures coincide.
    """
    b, r = counts.shape[0], arms[0].shape[0]
    rec_total, two_total = np.zeros(b), np.zeros(b)
    for sign, arm in zip((1.0, -1.0), arms):
        if combine == "mean":
            # Each seed's statistic under each replicate's counts, computed once for both figures.
            per = np.stack([_weighted(metric, y, arm[i], counts) for i in range(r)], axis=1)   # (B, R)
            rec = per.mean(axis=1)
            two = rec if seeds is None else _nanmean(np.take_along_axis(per, seeds, axis=1), 1)[0]
        else:
            rec = _weighted(metric, y, arm.mean(axis=0), counts)
            two = rec if seeds is None else np.empty(b)
            if seeds is not None:
                # An ensemble depends only on which seeds were drawn, not their order: one sort per
                # multiset (10 of them for R = 3); the multiset of all R is the records-only ensemble.
                keys = np.sort(seeds, axis=1)
                uniq, inv = np.unique(keys, axis=0, return_inverse=True)
                inv = inv.reshape(-1)
                for g, members in enumerate(uniq):
                    rows = np.flatnonzero(inv == g)
                    if np.array_equal(members, np.arange(r)):
                        two[rows] = rec[rows]
                    else:
                        two[rows] = _weighted(metric, y, arm[members].mean(axis=0), counts[rows])
        rec_total += sign * rec
        two_total += sign * two
    return rec_total, two_total


# ------------------------------------------------------------------ decisions

def oriented(iv: Interval, mode: str) -> tuple[float, tuple[float, float]]:
    """(value, ci) turned so that larger is better ("min" metrics such as MAE are negated)."""
    if mode == "max":
        return iv.value, iv.ci
    return -iv.value, (-iv.ci[1], -iv.ci[0])


def decisive(margin_ci: tuple[float, float]) -> bool:
    """A step's choice is decisive when the winner's oriented margin CI excludes 0."""
    lo = margin_ci[0]
    return bool(math.isfinite(lo) and lo > 0.0)


VERDICTS = ("non-inferior", "inconclusive", "inferior")


def noninferiority(delta: Interval, margin: float, mode: str) -> dict:
    """Verdict on delta = metric(subset) - metric(reference) at margin delta_0 > 0.

    Higher-is-better metrics: non-inferior when the CI's lower bound lies above -margin;
    inferior when its upper bound lies below -margin; inconclusive otherwise (the data
    cannot tell). Lower-is-better (MAE): the mirror image around +margin.
    """
    if not margin > 0:
        raise ValueError(f"invalid setting margin={margin}: must be > 0")
    value, (lo, hi) = oriented(delta, mode)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        verdict = "inconclusive"
    elif lo > -margin:
        verdict = "non-inferior"
    elif hi < -margin:
        verdict = "inferior"
    else:
        verdict = "inconclusive"
    return {"delta": delta.value, "ci": list(delta.ci), "ci_records": list(delta.ci_records),
            "delta_per_seed": delta.per_seed, "delta_seed_sd": delta.seed_sd, "margin": float(margin),
            "verdict": verdict, "noninferior": verdict == "non-inferior",
            "training_variance": delta.training_variance}

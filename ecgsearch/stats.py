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
# Elements materialised per chunk of replicates (the resampled (B, R, n, k) block).
_CHUNK_ELEMENTS = 3_000_000


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _nanmean(_per_class(y, p)[0], 1)[0]


def _macro_auprc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _nanmean(_per_class(y, p)[1], 1)[0]


def _mae(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _regression_stats(y[..., 0], p[..., 0])[:, 0]


def _r2(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _regression_stats(y[..., 0], p[..., 0])[:, 1]


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
    stat = stat_for(metric)
    y, pa = _as_arrays(y, pa)
    arms = [pa]
    if pb is not None:
        _, pb = _as_arrays(y, pb)
        if pb.shape != pa.shape:
            raise ValueError(f"the two arms must have the same (seeds, n, k); got {pa.shape} and {pb.shape}")
        arms.append(pb)
    r, n = pa.shape[0], pa.shape[1]

    def value(yy: np.ndarray, sel: list[np.ndarray]) -> np.ndarray:
        out = _combine(stat, yy, sel[0], combine)
        return out - _combine(stat, yy, sel[1], combine) if len(sel) == 2 else out

    point = float(value(y[None], [a[None] for a in arms])[0])
    per_seed = [float(value(y[None], [a[None, i:i + 1] for a in arms])[0]) for i in range(r)]
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, n, size=(n_boot, n))
    seeds = rng.integers(0, r, size=(n_boot, r)) if r > 1 else np.zeros((n_boot, 1), dtype=int)
    fixed = np.broadcast_to(np.arange(r), (n_boot, r))
    step = max(1, _CHUNK_ELEMENTS // max(1, r * pa[0].size))
    out = {}
    for name, sidx in (("two_level", seeds), ("records", fixed)):
        vals = []
        for s in range(0, n_boot, step):
            ri, si = rec[s:s + step], sidx[s:s + step]
            yy = y[ri]
            sel = [a[si[:, :, None], ri[:, None, :]] for a in arms]   # (b, R, n, k)
            vals.append(value(yy, sel))
        out[name] = _quantiles(np.concatenate(vals), alpha)
    sd = float(np.std(per_seed, ddof=1)) if r > 1 else math.nan
    return Interval(point, out["two_level"], out["records"], per_seed, sd, r, n, int(n_boot), combine)


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

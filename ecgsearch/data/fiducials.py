"""Interval and amplitude measurements of a 12-lead record, for comparing synthetic with real.

One simple, fixed method applied alike to every record (real or synthetic), so that differences
between the two are differences in the signals, not in the measuring. Not a clinical
measurement: on the median beat, QRS on/offset where the spatial velocity crosses a fraction of
its peak; P and T ends where the spatial magnitude falls to a fraction of its wave's peak.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import butter, find_peaks, sosfiltfilt

from ecgsearch.leads import LEADS

INTERVALS = ("hr_bpm", "pr_ms", "qrs_ms", "qt_ms")
_PRE_S, _POST_S = 0.40, 0.65   # median-beat window around each QRS


def _median_beat(x: np.ndarray, fs: int) -> tuple[np.ndarray, int, float, float] | None:
    sos = butter(2, [0.5, min(40.0, 0.45 * fs)], btype="band", fs=fs, output="sos")
    y = sosfiltfilt(sos, x, axis=1)
    e = np.convolve(np.abs(np.diff(y, axis=1)).sum(0), np.ones(3) / 3, mode="same")
    peaks, _ = find_peaks(e, height=0.35 * np.percentile(e, 99.5), distance=int(0.28 * fs))
    if peaks.size < 3:
        return None
    d = np.diff(peaks)
    rr = float(np.median(d)) / fs
    cv = float(np.std(d) / np.mean(d))
    pre, post = int(_PRE_S * fs), int(min(_POST_S, 0.9 * rr + 0.05) * fs)
    ok = peaks[(peaks >= pre) & (peaks + post < y.shape[1])]
    if ok.size < 2:
        return None
    beats = np.stack([y[:, p - pre:p + post] for p in ok])
    return np.median(beats, axis=0), pre, rr, cv


def measure(x: np.ndarray, fs: int, waves: bool = False) -> dict[str, float]:
    """Heart rate, PR, QRS and QT of a (12, T) mV record; NaN where a wave is not found.

    waves=True adds, per lead, in mV against the PR-segment level: the QRS peak-to-peak amplitude
    (`qrs_pp_<lead>`), the largest positive and negative QRS deflections (`r_`, `s_`), the most
    negative value in the first 40 ms of the QRS (`q_`, Q waves), the ST level 60 ms after the
    QRS (`st_`) and the T amplitude at the spatial T peak (`t_`, signed).
    """
    nan = float("nan")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(LEADS) or x.shape[1] < 2 * fs:
        raise ValueError(f"measure: need a (12, T) record in lead order {' '.join(LEADS)} with at least "
                         f"2 s of signal at {fs} Hz, got shape {x.shape}")
    out = dict.fromkeys(INTERVALS, nan)
    mb = _median_beat(x, fs)
    if mb is None:
        return out
    beat, r, rr, rr_cv = mb
    out["hr_bpm"] = 60.0 / rr
    v = np.linalg.norm(np.diff(beat, axis=1), axis=0)
    pk = r - int(0.06 * fs) + int(np.argmax(v[r - int(0.06 * fs):r + int(0.06 * fs)]))
    # QRS: where the spatial velocity stays above 10 % of its peak, bridging dips shorter than
    # 20 ms (the apex of R, notches).
    thr, g = 0.10 * v[pk], max(1, int(0.02 * fs))
    on = pk
    while on > g and v[on - g:on].max() > thr:
        on -= 1
    off = pk
    while off < v.size - g - 1 and v[off + 1:off + 1 + g].max() > thr:
        off += 1
    out["qrs_ms"] = 1e3 * (off - on) / fs
    base = beat[:, on - int(0.02 * fs):on].mean(axis=1, keepdims=True) if on > int(0.02 * fs) else beat[:, :1]
    mag = np.linalg.norm(beat - base, axis=0)
    # T wave: the largest magnitude from 80 ms after the QRS; its end where the magnitude has
    # fallen 80 % of the way from that peak to the lowest level after it.
    tp = None
    t0 = off + int(0.08 * fs)
    if t0 < mag.size - 2:
        tp = t0 + int(np.argmax(mag[t0:]))
        floor = float(mag[tp:].min())
        te = tp
        while te < mag.size - 1 and mag[te] > floor + 0.2 * (mag[tp] - floor):
            te += 1
        if te < mag.size - 1:
            out["qt_ms"] = 1e3 * (te - on) / fs
    # P wave: the largest magnitude 40-300 ms before the QRS onset (within 0.6 RR); its onset where
    # the magnitude has fallen 80 % of the way to the lowest level before it. A peak no larger than
    # the noise (AFIB's f waves, a flat P) gives NaN.
    lo = max(0, on - int(min(0.30, 0.6 * rr) * fs))
    seg = mag[lo:on - int(0.04 * fs)]
    # An irregularly irregular rhythm (RR CV > 0.15) has no fixed P-QRS coupling: no PR.
    if seg.size > 3 and rr_cv <= 0.15:
        pp = lo + int(np.argmax(seg))
        floor = float(mag[lo:pp + 1].min())
        noise = float(np.median(np.abs(np.diff(beat[:, lo:on], axis=1)))) * 10
        if mag[pp] - floor > max(0.025, noise):
            ps = pp
            while ps > lo and mag[ps] > floor + 0.2 * (mag[pp] - floor):
                ps -= 1
            if ps > lo:  # an onset inside the window; at its edge it is the previous T wave
                out["pr_ms"] = 1e3 * (on - ps) / fs
    if waves:
        q = beat[:, on:off + 1] - base
        early = q[:, :max(2, int(0.04 * fs))]
        j60 = min(off + int(0.06 * fs), beat.shape[1] - 1)
        for k, ld in enumerate(LEADS):
            out[f"qrs_pp_{ld}"] = float(q[k].max() - q[k].min())
            out[f"r_{ld}"], out[f"s_{ld}"] = float(q[k].max()), float(q[k].min())
            out[f"q_{ld}"] = float(min(early[k].min(), 0.0))
            out[f"st_{ld}"] = float(beat[k, j60] - base[k, 0])
            out[f"t_{ld}"] = float(beat[k, tp] - base[k, 0]) if tp is not None else nan
    return out


def amplitude_quantiles(rows: list[dict], qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, list[float]]:
    """Per-lead quantiles of the QRS peak-to-peak amplitude over records (measure(waves=True))."""
    out = {}
    for ld in LEADS:
        a = np.array([r.get(f"qrs_pp_{ld}", np.nan) for r in rows], dtype=float)
        a = a[np.isfinite(a)]
        out[ld] = np.quantile(a, qs).tolist() if a.size else [float("nan")] * len(qs)
    return out

"""A 3-D cardiac dipole model of the 12-lead ECG (see docs/SYNTHETIC.md).

The heart is one time-varying dipole d(t) = sum_w v_w * s_w(t): each wave w (P, the
QRS components, T) has a fixed direction/size v_w and a scalar time course s_w that
repeats every beat. Leads are projections: lead = M @ d, where M's limb rows are built
from I and II only, so Einthoven (III = II - I) and Goldberger (AVR = -(I+II)/2, ...)
hold by construction. Noise lives on the nine electrodes and reaches the leads through
the same wiring as on a real cart, so the identities hold for the noise too.

Coordinates: x = patient's left, y = inferior (towards the feet), z = anterior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GEN_FS = 500          # render rate; 100 Hz files are decimated from it, as in PTB-XL
MARGIN_S = 0.2        # rendered on each side so decimation filters see no edges
_BUF_S = (-3.0, 13.0)  # beats are laid out over this span, then cut to [-MARGIN, 10+MARGIN]


def _frontal(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    return np.array([np.cos(r), np.sin(r), 0.0])


def _horizontal(deg: float, tilt: float) -> np.ndarray:
    r = np.deg2rad(deg)  # angle from +x (left) towards +z (anterior)
    return np.array([np.cos(r), tilt, np.sin(r)])


# Precordial electrode directions (deg from left towards anterior), inferior tilt and gain:
# V1/V2 sit high and right-anterior; V2-V4 are closest to the heart, hence the larger gains.
_PRECORDIAL = {"V1": (115, -0.15, 1.2), "V2": (95, -0.1, 1.6), "V3": (78, 0.0, 1.7),
               "V4": (60, 0.1, 1.6), "V5": (35, 0.1, 1.35), "V6": (10, 0.1, 1.05)}


def lead_matrix() -> np.ndarray:
    """(12, 3) projection of the dipole onto I II III AVR AVL AVF V1-V6."""
    i, ii = _frontal(0.0), _frontal(60.0)
    limb = [i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2]
    prec = [g * _horizontal(a, t) for a, t, g in _PRECORDIAL.values()]
    return np.vstack(limb + prec)


def electrode_matrix() -> np.ndarray:
    """(12, 9) wiring from electrode potentials RA LA LL V1..V6 to the 12 leads."""
    m = np.zeros((12, 9))
    ra, la, ll = np.eye(9)[0], np.eye(9)[1], np.eye(9)[2]
    m[0], m[1], m[2] = la - ra, ll - ra, ll - la
    m[3], m[4], m[5] = ra - (la + ll) / 2, la - (ra + ll) / 2, ll - (ra + la) / 2
    wilson = (ra + la + ll) / 3  # Wilson central terminal, the precordial reference
    for k in range(6):
        m[6 + k] = np.eye(9)[3 + k] - wilson
    return m


LEAD_MATRIX = lead_matrix()
ELECTRODE_MATRIX = electrode_matrix()


@dataclass
class HeartParams:
    """Everything that shapes one record's dipole. Times in seconds, amplitudes in mV."""

    hr: float                 # mean ventricular rate, bpm
    rr_cv: float              # beat-to-beat RR variability (0.02 sinus, ~0.2 AFIB)
    pr: float                 # P onset -> QRS onset
    qrs: float                # QRS duration
    qtc: float                # Bazett-corrected QT
    axis: float               # frontal QRS axis, degrees
    amp: float                # main QRS vector size
    t_amp: float
    p_amp: float
    morph: str = "normal"     # normal | crbbb | clbbb
    afib: bool = False        # no P waves, fibrillatory baseline, irregular RR
    f_amp: float = 0.0        # f-wave amplitude (AFIB)
    f_hz: float = 6.0
    mi: str | None = None     # None | "IMI" | "ASMI"
    sttc: bool = False
    lvh: bool = False
    noise: float = 0.015      # electrode white noise SD at GEN_FS
    wander: float = 0.1       # electrode baseline-wander amplitude

    @property
    def qt_at_rate(self) -> float:
        return self.qtc * np.sqrt(60.0 / self.hr)


def _waves(p: HeartParams) -> list[tuple[float, float, float, np.ndarray, str]]:
    """(offset from QRS centre, sigma_left, sigma_right, vector, kind) of every wave."""
    w, a = p.qrs, p.amp
    ax = np.deg2rad(p.axis)
    main = np.array([np.cos(ax), np.sin(ax), -0.25])
    septal = np.array([-0.6, 0.2, 0.75])
    waves: list[tuple[float, float, float, np.ndarray, str]] = []
    if p.morph == "normal":
        waves += [(-0.32 * w, 0.09 * w, 0.09 * w, 0.18 * a * septal, "qrs"),
                  (-0.02 * w, 0.13 * w, 0.13 * w, a * main, "qrs"),
                  (0.27 * w, 0.10 * w, 0.10 * w, 0.35 * a * np.array([-0.35, -0.25, -0.9]), "qrs")]
    elif p.morph == "crbbb":
        # Normal left-sided activation, then a slow late rightward-anterior force:
        # the R' in V1 and the broad S in I and V6.
        waves += [(-0.38 * w, 0.07 * w, 0.07 * w, 0.18 * a * septal, "qrs"),
                  (-0.16 * w, 0.10 * w, 0.10 * w, a * main, "qrs"),
                  (0.05 * w, 0.08 * w, 0.08 * w, 0.30 * a * np.array([-0.35, -0.25, -0.9]), "qrs"),
                  (0.30 * w, 0.13 * w, 0.13 * w, 0.75 * a * np.array([-0.55, -0.1, 0.85]), "qrs")]
    elif p.morph == "clbbb":
        # Septum activated from the right (no septal q in I/V6), then a slow, notched,
        # leftward-posterior front: QS in V1, broad notched R in I and V6.
        waves += [(-0.40 * w, 0.07 * w, 0.07 * w, 0.15 * a * np.array([0.6, 0.1, -0.3]), "qrs"),
                  (-0.18 * w, 0.14 * w, 0.14 * w, 0.9 * a * np.array([0.85, 0.25, -0.55]), "qrs"),
                  (0.15 * w, 0.15 * w, 0.15 * w, a * np.array([0.8, 0.1, -0.7]), "qrs")]
    else:
        raise ValueError(f"unknown QRS morphology {p.morph!r}")
    if p.mi == "IMI":    # initial force away from the inferior wall: Q in II, III, AVF
        waves.append((-0.36 * w, 0.10 * w, 0.10 * w, 0.45 * a * np.array([0.1, -1.0, 0.0]), "qrs"))
    elif p.mi == "ASMI":  # initial force away from the anterior septum: QS in V1-V3
        waves.append((-0.36 * w, 0.10 * w, 0.10 * w, 0.45 * a * np.array([0.0, 0.1, -1.0]), "qrs"))
    # T wave: concordant with the QRS normally, discordant in bundle branch block.
    t_ax = np.deg2rad(0.6 * p.axis + 15.0)
    t_vec = p.t_amp * np.array([np.cos(t_ax), np.sin(t_ax), 0.35])
    if p.morph == "clbbb":
        t_vec = -0.8 * p.t_amp * np.array([0.8, 0.15, -0.6])
    elif p.morph == "crbbb":
        t_vec = t_vec + p.t_amp * np.array([0.0, 0.0, -0.6])
    if p.mi == "IMI":
        t_vec = t_vec + p.t_amp * np.array([0.0, -0.8, 0.0])
    elif p.mi == "ASMI":
        t_vec = t_vec + p.t_amp * np.array([0.0, 0.0, -0.9])
    if p.sttc:            # T inversion plus ST depression in the lateral leads
        t_vec = -0.7 * t_vec
    if p.lvh:             # strain: lateral T flattening/inversion
        t_vec = t_vec - p.t_amp * np.array([0.7, 0.2, 0.0])
    qrs_on = -w / 2
    t_peak = qrs_on + p.qt_at_rate - 2.0 * 0.04  # the falling limb ends at QT
    waves.append((t_peak, 0.06, 0.04, t_vec, "t"))
    if p.sttc or p.lvh:
        st = -0.1 * np.array([0.8, 0.5, -0.4])
        waves.append((w / 2 + 0.08, 0.05, 0.05, st, "t"))
    if not p.afib:
        p_vec = p.p_amp * np.array([np.cos(np.deg2rad(55)), np.sin(np.deg2rad(55)), 0.25])
        waves.append((qrs_on - p.pr + 0.05, 0.022, 0.022, p_vec, "p"))
    return waves


def _beats(p: HeartParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """QRS centre times over the render buffer and per-beat amplitude factors."""
    rr0 = 60.0 / p.hr
    t = [_BUF_S[0] + 0.4 + rng.uniform(0, rr0)]
    resp_hz, resp_ph = rng.uniform(0.2, 0.33), rng.uniform(0, 2 * np.pi)
    while t[-1] < _BUF_S[1] - 0.8:
        if p.afib:   # "irregularly irregular": independent log-normal intervals
            rr = rr0 * np.exp(rng.normal(-0.5 * p.rr_cv ** 2, p.rr_cv))
        else:        # sinus: respiratory arrhythmia plus a little jitter
            rr = rr0 * (1 + 0.03 * np.sin(2 * np.pi * resp_hz * t[-1] + resp_ph)
                        + rng.normal(0, p.rr_cv))
        t.append(t[-1] + float(np.clip(rr, 0.28, 2.5)))
    times = np.asarray(t)
    gain = 1 + 0.05 * np.sin(2 * np.pi * resp_hz * times + resp_ph) + rng.normal(0, 0.02, times.size)
    return times, gain


def _kernel(sl: float, sr: float, fs: int) -> tuple[np.ndarray, int]:
    n_l, n_r = int(np.ceil(4 * sl * fs)), int(np.ceil(4 * sr * fs))
    t = np.arange(-n_l, n_r + 1) / fs
    k = np.where(t < 0, np.exp(-0.5 * (t / sl) ** 2), np.exp(-0.5 * (t / sr) ** 2))
    return k, n_l


def render(p: HeartParams, rng: np.random.Generator, noise: bool = True) -> np.ndarray:
    """(12, T) float64 mV at GEN_FS over [-MARGIN_S, 10 + MARGIN_S)."""
    fs = GEN_FS
    n_buf = int(round((_BUF_S[1] - _BUF_S[0]) * fs))
    times, gain = _beats(p, rng)
    waves = _waves(p)
    tracks = np.empty((len(waves), n_buf))
    for j, (off, sl, sr, _, _kind) in enumerate(waves):
        k, n_l = _kernel(sl, sr, fs)
        start = np.rint((times + off - _BUF_S[0]) * fs).astype(np.int64) - n_l
        idx = (start[:, None] + np.arange(k.size)[None, :]).ravel()
        keep = (idx >= 0) & (idx < n_buf)
        w = (gain[:, None] * k[None, :]).ravel()
        tracks[j] = np.bincount(idx[keep], weights=w[keep], minlength=n_buf)
    vecs = np.stack([v for _, _, _, v, _ in waves])          # (W, 3)
    lo = int(round((-MARGIN_S - _BUF_S[0]) * fs))
    n_out = int(round((10.0 + 2 * MARGIN_S) * fs))
    dip = vecs.T @ tracks[:, lo:lo + n_out]                   # (3, T)
    t = (np.arange(n_out) / fs) - MARGIN_S
    if p.afib and p.f_amp > 0:
        # Fibrillatory waves: a wandering 4-9 Hz atrial dipole, largest in V1 and inferiorly.
        f_inst = p.f_hz * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t))
        phase = 2 * np.pi * np.cumsum(f_inst) / fs + rng.uniform(0, 2 * np.pi)
        env = p.f_amp * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t))
        dip += np.outer([-0.2, 0.55, 0.8], env * np.sin(phase))
        dip += np.outer([0.5, 0.2, -0.3], 0.5 * env * np.sin(1.07 * phase + 1.0))
    leads = LEAD_MATRIX @ dip
    if noise:
        elec = rng.standard_normal((9, n_out), dtype=np.float32)
        elec *= np.float32(p.noise)
        # Baseline wander (< 0.5 Hz): two sinusoids per electrode, evaluated on a 25 Hz
        # grid and interpolated - it is smooth, and full-rate sin() was half the cost.
        f = rng.uniform(0.05, 0.5, size=(9, 2, 1))
        ph = rng.uniform(0, 2 * np.pi, size=(9, 2, 1))
        amp = p.wander * rng.uniform(0.2, 1.0, size=(9, 2, 1))
        tc = t[::fs // 25]
        coarse = (amp * np.sin(2 * np.pi * f * tc + ph)).sum(axis=1)
        for e in range(9):
            elec[e] += np.interp(t, tc, coarse[e]).astype(np.float32)
        leads += ELECTRODE_MATRIX @ elec
    return leads

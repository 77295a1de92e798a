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

from ecgsearch.data.artifacts import Artifacts

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


def lead_matrix(limb_gain: float = 1.0, precordial_gain=None, rotation: np.ndarray | None = None,
                precordial_shift_deg=None, lead_gain=None) -> np.ndarray:
    """(12, 3) projection of the dipole onto I II III AVR AVL AVF V1-V6.

    The defaults are the textbook torso. A patient's own geometry (realism.py) scales the limb
    leads, moves the precordial electrodes (degrees around the chest), rotates the heart
    (`rotation`, 3x3, applied to the dipole) and gives I, II and V1-V6 their own gains; the other
    four limb leads are derived from I and II afterwards, so Einthoven and Goldberger still hold.
    """
    gains = [g for _, _, g in _PRECORDIAL.values()] if precordial_gain is None else list(precordial_gain)
    shift = np.zeros(6) if precordial_shift_deg is None else np.asarray(precordial_shift_deg, float)
    lg = np.ones(8) if lead_gain is None else np.asarray(lead_gain, float)
    i, ii = limb_gain * lg[0] * _frontal(0.0), limb_gain * lg[1] * _frontal(60.0)
    limb = [i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2]
    prec = [lg[2 + k] * g * _horizontal(a + shift[k], t)
            for k, ((a, t, _), g) in enumerate(zip(_PRECORDIAL.values(), gains))]
    m = np.vstack(limb + prec)
    return m if rotation is None else m @ rotation


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
_TEXTBOOK = {"main_z": -0.25, "late": (-0.35, -0.25, -0.9), "late_size": 0.35, "t_z": 0.35}
# Initial QRS force of each infarct (away from the dead wall) and its T-wave change.
_MI_DIR = {"IMI": np.array([0.1, -1.0, 0.0]), "ASMI": np.array([0.0, 0.1, -1.0]),
           "ALMI": np.array([-0.9, 0.1, -0.35])}
_MI_T = {"IMI": np.array([0.0, -0.8, 0.0]), "ASMI": np.array([0.0, 0.0, -0.9]),
         "ALMI": np.array([-0.8, 0.0, -0.3])}


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
    mi: str | None = None     # None | "IMI" | "ASMI" | "ALMI"
    sttc: float = 0.0         # ST-T change severity (0 none, 1 textbook inversion)
    lvh: float = 0.0          # LVH strain severity (the voltage is in amp and axis)
    noise: float = 0.015      # electrode white noise SD at GEN_FS
    wander: float = 0.1       # electrode baseline-wander amplitude
    mi_sev: float = 1.0       # size of the infarct's Q force and T change
    mi_lost_r: float = 0.0    # fraction of the main R force lost towards the infarcted wall
    irbbb: float = 0.0        # incomplete RBBB: size of a small terminal rightward-anterior force
    lafb: float = 0.0         # LAFB: size of a terminal superior force (S in II, III, AVF, V5, V6)
    mi_q: float = 0.45        # infarct Q force relative to amp, at mi_sev 1
    mi_q_width: float = 0.10  # its time spread (sigma) as a fraction of the QRS duration
    main_dz: float = 0.0      # anterior(+)/posterior(-) shift of the main QRS force (LVH: posterior)
    st_dep: float = 0.0       # lateral ST depression (mV) outside STTC/LVH (with age, as in real data)
    st_elev: float = 0.0      # anterior ST elevation (mV): early repolarisation of the young
    # Per-patient morphology: every wave's width, timing and vector perturbed by this fraction
    # (seeded by jitter_seed), so no two hearts share one template - a model must learn the
    # signature, not the generator's exact wave shapes.
    jitter: float = 0.0
    jitter_seed: int = 0
    rsa: float = 0.03         # respiratory sinus arrhythmia: RR modulation depth (falls with age)
    shape: dict | None = None  # QRS/T shape (realism.PTBXL_SHAPE); None: the textbook shape
    lead_m: np.ndarray | None = None  # this patient's (12, 3) lead matrix; None: LEAD_MATRIX
    artifacts: Artifacts | None = None  # None: white noise (`noise`) and wander (`wander`) only

    @property
    def qt_at_rate(self) -> float:
        return self.qtc * np.sqrt(60.0 / self.hr)


def _waves(p: HeartParams) -> list[tuple[float, float, float, np.ndarray, str]]:
    """(offset from QRS centre, sigma_left, sigma_right, vector, kind) of every wave."""
    w, a = p.qrs, p.amp
    sh = p.shape or _TEXTBOOK
    ax = np.deg2rad(p.axis)
    main = np.array([np.cos(ax), np.sin(ax), sh["main_z"] + p.main_dz])
    if p.mi and p.mi_lost_r > 0:  # necrotic wall: less depolarising force towards it
        u = -_MI_DIR[p.mi] / np.linalg.norm(_MI_DIR[p.mi])
        main = main - p.mi_lost_r * p.mi_sev * max(float(main @ u), 0.0) * u
    septal = np.array([-0.6, 0.2, 0.75])
    late = sh["late_size"] * a * np.asarray(sh["late"], dtype=float)
    waves: list[tuple[float, float, float, np.ndarray, str]] = []
    if p.morph == "normal":
        waves += [(-0.32 * w, 0.09 * w, 0.09 * w, 0.18 * a * septal, "qrs"),
                  (-0.02 * w, 0.13 * w, 0.13 * w, a * main, "qrs"),
                  (0.27 * w, 0.10 * w, 0.10 * w, late, "qrs")]
        if p.irbbb > 0:  # small, slightly late rightward-anterior force: the r' of IRBBB in V1
            waves.append((0.42 * w, 0.09 * w, 0.09 * w, p.irbbb * a * np.array([-0.8, -0.1, 0.6]), "qrs"))
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
    if p.mi:  # initial force away from the infarct: Q in II, III, AVF (IMI), QS in V1-V3
        # (ASMI), Q in I, AVL, V5, V6 (ALMI)
        # Textbook (mi_q_width 0.10): a narrow early force. Real pathological Q waves last
        # >= 30-40 ms: mi_q_width ~0.2 of the QRS, overlapping the start of R.
        qw = p.mi_q_width
        waves.append((-0.36 * w + (qw - 0.10) * w, qw * w, qw * w, p.mi_q * p.mi_sev * a * _MI_DIR[p.mi], "qrs"))
    if p.lafb > 0:  # the left anterior fascicle activates last: a late superior-posterior force
        waves.append((0.30 * w, 0.10 * w, 0.10 * w, p.lafb * a * np.array([0.0, -0.9, -0.45]), "qrs"))
    # T wave: concordant with the QRS normally, discordant in bundle branch block.
    t_ax = np.deg2rad(0.6 * p.axis + 15.0)
    t_vec = p.t_amp * np.array([np.cos(t_ax), np.sin(t_ax), sh["t_z"]])
    if p.morph == "clbbb":
        t_vec = -0.8 * p.t_amp * np.array([0.8, 0.15, -0.6])
    elif p.morph == "crbbb":
        t_vec = t_vec + p.t_amp * np.array([0.0, 0.0, -0.6])
    if p.mi:
        t_vec = t_vec + p.mi_sev * p.t_amp * _MI_T[p.mi]
    if p.sttc:            # T inversion plus ST depression in the lateral leads
        t_vec = -0.7 * t_vec if p.sttc >= 1 else (1 - 1.7 * p.sttc) * t_vec
    if p.lvh:             # strain: lateral T flattening/inversion
        t_vec = t_vec - p.lvh * p.t_amp * np.array([0.7, 0.2, 0.0])
    qrs_on = -w / 2
    t_peak = qrs_on + p.qt_at_rate - 2.0 * 0.04  # the falling limb ends at QT
    waves.append((t_peak, 0.06, 0.04, t_vec, "t"))
    if p.sttc or p.lvh or p.st_dep:
        st = -(0.1 * max(float(p.sttc), float(p.lvh)) + p.st_dep) * np.array([0.8, 0.5, -0.4])
        waves.append((w / 2 + 0.08, 0.05, 0.05, st, "t"))
    if p.st_elev:
        waves.append((w / 2 + 0.07, 0.05, 0.06, p.st_elev * np.array([0.1, 0.0, 1.0]), "t"))
    if not p.afib:
        p_vec = p.p_amp * np.array([np.cos(np.deg2rad(55)), np.sin(np.deg2rad(55)), 0.25])
        waves.append((qrs_on - p.pr + 0.05, 0.022, 0.022, p_vec, "p"))
    if p.jitter > 0:
        r = np.random.default_rng(p.jitter_seed)
        j = p.jitter
        out = []
        for off, sl, sr, v, kind in waves:
            scale = 0.5 if kind == "p" else 1.0   # P: small, keep it recognisable
            v = v + j * scale * float(np.linalg.norm(v)) * r.standard_normal(3) / np.sqrt(3)
            f = np.exp(j * (0.5 if kind == "qrs" else 1.0) * r.normal(0, 1, 2))
            dt = j * 0.3 * (w if kind == "qrs" else 0.05) * r.normal()
            out.append((off + dt, sl * f[0], sr * f[1], v, kind))
        waves = out
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
            rr = rr0 * (1 + p.rsa * np.sin(2 * np.pi * resp_hz * t[-1] + resp_ph)
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
    leads = (LEAD_MATRIX if p.lead_m is None else p.lead_m) @ dip
    if noise:
        # The textbook electrodes: white noise and baseline wander only.
        art = p.artifacts or Artifacts(white=p.noise, wander=p.wander, emg=0.0, mains=0.0, motion=0.0)
        leads += ELECTRODE_MATRIX @ art.electrode_noise(t, fs, rng)
    return leads

"""A `Realism` applied to one record: the heart that was recorded, and the labels that were written.

synth.py first draws the record as the textbook generator does (same random numbers, so the
clean preset is unchanged); these functions then, from a random stream of their own, make the
disease partial, let statements co-occur, add subtle conduction findings, give the patient a
torso and electrodes of their own, let age act through weak noisy features, and decide what the
cardiologist wrote down. The signal always follows the true heart; the database holds the
statement. See docs/SYNTHETIC.md for every source of difficulty and its calibration.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ecgsearch.data.artifacts import draw_artifacts
from ecgsearch.data.dipole import HeartParams, lead_matrix
from ecgsearch.data.realism import Realism

# PTB-XL's MI subclasses by size: inferior, anterior(-septal), lateral.
MI_MIX = (("IMI", 0.45), ("ASMI", 0.40), ("ALMI", 0.15))
# Conditional rates added to a record with MI (co-occurrence; PTB-XL: ~30 % of MI also STTC).
CO_STTC, CO_HYP = 0.20, 0.08
LIKELIHOODS = (15.0, 35.0, 50.0, 80.0, 100.0)


def severity(rng: np.random.Generator, r: Realism) -> float:
    """How much of the textbook signature a diseased heart shows: lo + (1 - lo) * Beta(a, a)."""
    if r.severity_lo >= 1.0:
        return 1.0
    return float(r.severity_lo + (1 - r.severity_lo) * rng.beta(r.severity_beta, r.severity_beta))


def realistic_diagnosis(dx: dict, rng: np.random.Generator, r: Realism) -> tuple[dict, dict]:
    """(the true diagnosis with severities, the stated one). Rhythm and bundle branch blocks are
    never missed nor invented: they keep their physiological definitions."""
    true = dict(dx)
    if true["mi"]:
        names, p = zip(*MI_MIX)
        true["mi"] = str(rng.choice(names, p=p))
        if r.co_occurrence > 1:
            if not true["sttc"] and rng.random() < (r.co_occurrence - 1) * CO_STTC / 0.6:
                true["sttc"] = ("NDT", "ISC_")[int(rng.integers(2))]
            if not true["lvh"] and rng.random() < (r.co_occurrence - 1) * CO_HYP / 0.6:
                true["lvh"] = True
    true["subtle_cd"] = (("IRBBB", "IVCD")[int(rng.integers(2))]
                         if true["bbb"] is None and rng.random() < r.subtle_cd else None)
    true["sev"] = {k: severity(rng, r) for k in ("mi", "sttc", "lvh", "subtle_cd")}
    stated = dict(true)
    for key in ("mi", "sttc", "lvh", "subtle_cd"):
        # Weak signatures are missed more often: P(miss) = missed * (1 - sev) / E[1 - sev].
        mean_gap = max(1.0 - (r.severity_lo + 1.0) / 2, 1e-6)
        if true[key] and rng.random() < min(1.0, r.missed * (1 - true["sev"][key]) / mean_gap):
            stated[key] = None if key != "lvh" else False
    if true["lafb"] and rng.random() < r.missed / 2:
        stated["lafb"] = False
    for key, code in (("mi", "IMI"), ("sttc", "NDT"), ("lvh", True)):
        if not true[key] and rng.random() < r.spurious:  # over-read: stated, not in the signal
            stated[key] = code
    stated["sev"] = dict(true["sev"])
    return true, stated


def likelihood_fn(stated: dict, rng: np.random.Generator, r: Realism):
    """key -> the likelihood written for a stated finding (synth.scp_codes' `lik`), or None for
    PTB-XL's overall distribution. With likelihood_follows_severity weak findings read 'possible'."""
    if not r.likelihood_follows_severity:
        return None

    def lik(key: str) -> float:
        s = stated["sev"].get(key, 1.0)
        return LIKELIHOODS[int(np.clip(np.round(s * 4 + rng.normal(0, 0.7)), 0, 4))]
    return lik


def _rotation(rng: np.random.Generator, sd_deg: float) -> np.ndarray:
    """A rotation by N(0, sd) degrees about a uniformly random axis (Rodrigues)."""
    k = rng.standard_normal(3)
    k /= np.linalg.norm(k)
    th = np.deg2rad(rng.normal(0, sd_deg))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * kx @ kx


def geometry(rng: np.random.Generator, r: Realism) -> np.ndarray:
    """This patient's (12, 3) lead matrix: heart orientation, electrodes, habitus."""
    habitus = float(np.exp(rng.normal(0, r.habitus_sd)))
    return habitus * lead_matrix(
        limb_gain=r.limb_gain, precordial_gain=r.precordial_gain,
        rotation=_rotation(rng, r.rotation_deg) if r.rotation_deg else None,
        precordial_shift_deg=rng.normal(0, r.electrode_deg, 6),
        lead_gain=np.exp(rng.normal(0, r.lead_gain_sd, 8)))


def _redraw(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    # A truncated normal by rejection: clipping would pile records on the threshold itself.
    for _ in range(100):
        v = rng.normal(mean, sd)
        if lo <= v <= hi:
            return float(v)
    return float(np.clip(mean, lo, hi))


def realistic_params(hp: HeartParams, dx: dict, age: float, sex: int, rng: np.random.Generator,
                     r: Realism) -> HeartParams:
    """The textbook `hp` redrawn with this realism's variability (dx: the true diagnosis)."""
    a0 = 62.0 if np.isnan(age) else float(np.clip(age, 18, 95))
    fem = sex == 1
    n = rng.normal
    # Each age-dependent feature follows its own "physiological age": several weak, noisy
    # features rather than one clean one.
    pa = lambda: float(np.clip(a0 + n(0, r.age_noise), 18, 100)) - 20.0  # noqa: E731
    sh = r.shape
    sev = dx.get("sev", {})
    axis = sh["axis_at_20"] + sh["axis_per_year"] * pa() + n(0, sh["axis_sd"])
    axis = float(rng.uniform(-75, -45) if dx["lafb"] else np.clip(axis, -40, 110))
    amp = (1.9 - 0.014 * pa()) * np.exp(n(0, 0.15)) * (0.85 if fem else 1.0)
    lvh = sev.get("lvh", 1.0) if dx["lvh"] else 0.0
    if lvh:
        amp, axis = amp * (1 + 1.4 * lvh), axis - 20 * lvh
    if dx["rhythm"] == "SR":  # sinus 60-100 bpm; truncated so the rhythm codes stay exact
        hr = _redraw(rng, 61 + 3 * fem, 11, 60.5, 99.5)
    elif dx["rhythm"] == "SBRAD":
        hr = float(rng.uniform(40, 58))
    elif dx["rhythm"] == "STACH":
        hr = float(rng.uniform(102, 145))
    else:
        hr = hp.hr
    pr = (float(rng.uniform(0.21, 0.32)) if dx["1AVB"]
          else _redraw(rng, 0.150 + 0.0009 * pa(), 0.015, 0.11, 0.198))
    qrs, irbbb = hp.qrs, 0.0
    if dx["bbb"] is None:
        qrs = _redraw(rng, 0.060 + 0.0001 * pa() + 0.005 * (not fem), 0.008, 0.052, 0.104)
        qrs += 0.008 * dx["lafb"]
        if dx["subtle_cd"] == "IRBBB":
            qrs, irbbb = float(rng.uniform(0.100, 0.118)), 0.15 + 0.35 * sev.get("subtle_cd", 1.0)
        elif dx["subtle_cd"] == "IVCD":
            qrs = float(rng.uniform(0.108, 0.119))  # below the 120 ms of complete blocks
    qtc = 0.375 + 0.0008 * pa() + 0.012 * fem + 0.03 * bool(dx["bbb"]) + n(0, 0.018)
    return replace(
        # Heart-rate variability falls steeply with age (respiratory sinus arrhythmia ~7 % of
        # RR at 20, ~1.5 % at 80): one of the strongest age signals a 10-s record holds.
        hp, rsa=float(0.08 * np.exp(-pa() / 30) * np.exp(n(0, 0.25))),
        rr_cv=hp.rr_cv if dx["rhythm"] == "AFIB" else float(0.02 * np.exp(-pa() / 50) * np.exp(n(0, 0.3))),
        hr=hr, pr=pr, qrs=qrs, qtc=qtc, axis=axis, amp=float(amp),
        t_amp=float((0.42 - 0.0025 * pa()) * np.exp(n(0, 0.2)) * (0.9 if fem else 1.0)),
        p_amp=float(0.16 * np.exp(n(0, 0.25))), mi=dx["mi"], mi_sev=sev.get("mi", 1.0),
        mi_lost_r=0.9, mi_q=0.45, mi_q_width=0.2, st_dep=float(max(0.0, 0.0008 * pa() + n(0, 0.015))),
        # early repolarisation: ST elevation in V1-V3 of young men, fading with age
        st_elev=float(max(0.0, (0.12 if not fem else 0.05) * np.exp(-pa() / 25) + n(0, 0.02))), sttc=sev.get("sttc", 1.0) if dx["sttc"] else 0.0, lvh=1.5 * lvh,
        jitter=r.morphology_jitter, jitter_seed=int(rng.integers(2**31)), main_dz=-0.3 * lvh, lafb=0.45 if dx["lafb"] else 0.0, irbbb=irbbb,
        shape=dict(sh), lead_m=geometry(rng, r), artifacts=draw_artifacts(rng, r))

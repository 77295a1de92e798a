"""How hard the synthetic PTB-XL is: every source of real-world difficulty, one setting each.

A `Realism` is a frozen bundle of settings read by synth.py (labels, physiology) and dipole.py
(geometry, shape, noise). Two presets:

- "ptbxl" (the default): calibrated so that a small model trained on a few hundred synthetic
  records scores about as it does on as many real PTB-XL records (bench/synth_realism.py,
  docs/SYNTHETIC.md). Labels are what a cardiologist wrote, not what the heart did.
- "clean": the textbook generator (unambiguous signatures, every label stated, one torso,
  clean electrodes). Tests that check a mechanism rather than a difficulty use it; its
  records are byte-identical to those written before realism existed.

Every field is documented where it is declared; `with_overrides` changes any of them by name
and refuses unknown names. Random draws for realism come from their own generator stream, so
the clean preset consumes the same random numbers as before and stays reproducible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

# Median QRS/T shape of the real NORM records of the PTB-XL sample (fitted by least squares on
# their median beats at 500 Hz); the clean preset keeps the original textbook shape.
PTBXL_SHAPE = {"axis_at_20": 65.0, "axis_per_year": -0.7, "axis_sd": 18.0, "main_z": 0.09,
               "late": (0.067, -0.282, -0.927), "late_size": 0.41, "t_z": 0.75}
CLEAN_SHAPE = {"axis_at_20": 76.0, "axis_per_year": -1.2, "axis_sd": 7.0, "main_z": -0.25,
               "late": (-0.35, -0.25, -0.9), "late_size": 0.35, "t_z": 0.35}


@dataclass(frozen=True)
class Realism:
    name: str = "custom"
    # --- labels: what the reading cardiologist wrote -------------------------------------------
    # P(a present diagnostic statement is not written) for MI/STTC/HYP/LAFB/IRBBB: PTB-XL's
    # single-reader labels miss mild disease (Strodthoff et al. 2020 report label noise as a
    # dominant error source).
    missed: float = 0.0
    # P(a statement is written for a record without it), per superclass statement.
    spurious: float = 0.0
    # Likelihoods (PTB-XL's 15/35/50/80/100) follow the signature's severity when True, so a
    # weak signature is written as "possible" and the benchmark's likelihood-free labels
    # (any likelihood counts) inherit the disagreement.
    likelihood_follows_severity: bool = False
    # --- signatures ----------------------------------------------------------------------------
    # Severity of MI/STTC/LVH ~ lo + (1 - lo) * Beta(a, a): most records carry a partial
    # signature. 1.0 everywhere (clean) gives the textbook one.
    severity_lo: float = 1.0
    severity_beta: float = 1.3
    # Extra odds of STTC and HYP in a record with MI (co-occurring statements, as in PTB-XL
    # where ~30 % of MI records also carry STTC).
    co_occurrence: float = 1.0
    # Fraction of records with a subtle conduction finding labelled CD (IRBBB, IVCD): QRS at
    # the upper normal range with a small terminal force, confusable with NORM.
    subtle_cd: float = 0.0
    # Rhythm codes keep their physiological definitions; these only move the normal ranges
    # towards the thresholds as in real data (normal PR up to 198 ms, sinus rate 60-100).
    borderline_intervals: bool = False
    # --- patients ------------------------------------------------------------------------------
    # Heart orientation (rotation about a random axis, deg SD), electrode placement shifts
    # (precordial angle SD in deg), per-lead gain (log SD) and body habitus (log SD of the
    # overall gain: fat and tissue attenuate).
    rotation_deg: float = 0.0
    electrode_deg: float = 0.0
    lead_gain_sd: float = 0.0
    habitus_sd: float = 0.0
    limb_gain: float = 1.0        # limb-lead size relative to the textbook projection
    precordial_gain: tuple[float, ...] = (1.2, 1.6, 1.7, 1.6, 1.35, 1.05)
    shape: dict = field(default_factory=lambda: dict(CLEAN_SHAPE))
    # Per-patient morphology: each wave's width, timing and vector perturbed by this fraction
    # (dipole.HeartParams.jitter): real hearts share no template.
    morphology_jitter: float = 0.0
    # Age acts through several weak features: SD (years) of the "physiological age" that
    # drives them around the stated age (0: every feature follows the stated age exactly).
    age_noise: float = 0.0
    # --- recording -----------------------------------------------------------------------------
    # Baseline wander amplitude (mV) drawn log-uniform in this range; muscle (EMG) bursts,
    # mains hum (50 Hz; at 100 Hz it is filtered out by the decimation, as on the real 100 Hz
    # files) and electrode motion (steps with slow recovery) with these per-record
    # probabilities.
    wander: tuple[float, float] = (0.03, 0.2)
    emg_p: float = 0.0
    mains_p: float = 0.0
    motion_p: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "clean": Realism(name="clean"),
    "ptbxl": Realism(
        name="ptbxl", missed=0.3, spurious=0.04, likelihood_follows_severity=True,
        severity_lo=0.1, severity_beta=1.3, co_occurrence=1.6, subtle_cd=0.06,
        borderline_intervals=True, rotation_deg=18.0, electrode_deg=8.0, lead_gain_sd=0.12,
        habitus_sd=0.12, limb_gain=0.92, precordial_gain=(1.35, 2.5, 2.3, 2.05, 1.5, 1.2),
        shape=dict(PTBXL_SHAPE), morphology_jitter=0.25, age_noise=3.0, wander=(0.005, 0.12), emg_p=0.35,
        mains_p=0.25, motion_p=0.08),
}
DEFAULT = "ptbxl"


def get_realism(spec: "str | Realism | dict | None" = None) -> Realism:
    """A preset by name ("ptbxl", "clean"), a Realism, or a dict of overrides on the default."""
    if spec is None:
        return PRESETS[DEFAULT]
    if isinstance(spec, Realism):
        return spec
    if isinstance(spec, dict):
        base = PRESETS.get(spec.get("name"), PRESETS[DEFAULT])
        return with_overrides(base, **{k: v for k, v in spec.items() if k != "name"})
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    raise ValueError(f"unknown realism {spec!r}: choose one of {', '.join(PRESETS)}")


def with_overrides(r: Realism, **kw) -> Realism:
    """`r` with the named settings changed; unknown names are an error."""
    names = {f.name for f in fields(Realism)}
    bad = sorted(set(kw) - names)
    if bad:
        raise ValueError(f"unknown realism setting(s) {', '.join(bad)}; settings: {', '.join(sorted(names))}")
    for f in fields(Realism):
        if f.name not in kw or f.name in ("name", "shape"):
            continue
        v, default = kw[f.name], getattr(r, f.name)
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, tuple):
            ok = (isinstance(v, (list, tuple)) and len(v) == len(default)
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
            kw[f.name] = tuple(float(x) for x in v) if ok else v
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise ValueError(f"realism setting {f.name} must be like {default!r}, got {v!r}")
    if "shape" in kw and not isinstance(kw["shape"], dict):
        raise ValueError(f"realism setting shape must be a dict of shape parameters, got {kw['shape']!r}")
    for k in ("missed", "spurious", "subtle_cd", "emg_p", "mains_p", "motion_p"):
        if k in kw and not 0.0 <= float(kw[k]) <= 1.0:
            raise ValueError(f"realism setting {k} is a probability in [0, 1], got {kw[k]!r}")
    if "shape" in kw:
        kw["shape"] = {**r.shape, **kw["shape"]}
    return replace(r, name=kw.pop("name", f"{r.name}+custom"), **kw)

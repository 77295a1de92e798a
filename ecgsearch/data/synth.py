"""Synthetic PTB-XL: the exact on-disk layout, filled from the dipole model in dipole.py.

`synthesize` writes ptbxl_database.csv, scp_statements.csv and records100/ and/or
records500/ (WFDB fmt 16, 1000 adu/mV), so the real reader and cache read it unchanged.
Extra files: synth_truth.json (settings, planted leads, class -> lead map) and
synth_params.csv (the heart parameters behind each record, for tests). See
docs/SYNTHETIC.md for the model and the planted mode.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import firwin, resample_poly

from ecgsearch.data.difficulty import LIKELIHOODS, likelihood_fn, realistic_diagnosis, realistic_params
from ecgsearch.data.dipole import GEN_FS, MARGIN_S, HeartParams, render
from ecgsearch.data.errors import DataError
from ecgsearch.data.ptbxl import DB_FILE, STATEMENTS_FILE
from ecgsearch.data.realism import Realism, get_realism
from ecgsearch.data.synth_tables import (
    DB_COLUMN_ORDER,
    draw_population,
    heart_axis_label,
    report_text,
    statements_frame,
)
from ecgsearch.data.wfdbio import write_fmt16
from ecgsearch.leads import LEADS, RHYTHM_CODES, SUPERCLASSES, normalize_lead_name, parse_leads

GAIN = 1000.0  # adu per mV, as PTB-XL
ENRICHED_PREVALENCE = 0.15
# PTB-XL prevalences of the six codes (fraction of all 21,799 records, rounded).
PTBXL_PREVALENCE = {"1AVB": 0.037, "CRBBB": 0.025, "CLBBB": 0.025,
                    "SBRAD": 0.029, "AFIB": 0.069, "STACH": 0.038}
# Superclass statement rates at age 62 (scaled with age: these are diseases of age).
MI_RATE, STTC_RATE, HYP_RATE, LAFB_RATE = 0.25, 0.24, 0.12, 0.08
AGE_TONE_HZ = 46.0      # planted age code: a tone far above the ECG's own spectrum
MARKER_BAND_HZ = (12.0, 40.0)  # label bursts: above most P/T energy, below the age tone
MARKER_S, MARKERS_PER_CLASS, MARKER_MV = 1.0, 3, 0.25
FS_CHOICES = {"100": (100,), "500": (500,), "both": (100, 500)}


def _prevalence(enrich: bool, rhythm_prevalence: float | None) -> dict[str, float]:
    if rhythm_prevalence is None and not enrich:
        return dict(PTBXL_PREVALENCE)
    p = ENRICHED_PREVALENCE if rhythm_prevalence is None else float(rhythm_prevalence)
    if not 0.0 < p <= 0.3:
        raise ValueError(f"rhythm_prevalence must be in (0, 0.3] (three rhythms share one "
                         f"record), got {rhythm_prevalence!r}")
    return dict.fromkeys(RHYTHM_CODES, p)


def draw_diagnosis(rng: np.random.Generator, age: float, prev: dict[str, float]) -> dict:
    """One record's statements. Rhythms exclude each other; so do CRBBB and CLBBB."""
    u = rng.random()
    rhythm = "SR"
    for code in ("AFIB", "SBRAD", "STACH"):
        if u < prev[code]:
            rhythm = code
            break
        u -= prev[code]
    # 1AVB needs P waves: drawn among non-AFIB records, scaled to keep its overall rate.
    avb = rhythm != "AFIB" and rng.random() < prev["1AVB"] / (1 - prev["AFIB"])
    u = rng.random()
    bbb = "CRBBB" if u < prev["CRBBB"] else "CLBBB" if u < prev["CRBBB"] + prev["CLBBB"] else None
    f = 1.0 if np.isnan(age) else float(np.clip(0.45 + (age - 20) / 76, 0.3, 1.6))
    return {"rhythm": rhythm, "1AVB": bool(avb), "bbb": bbb,
            "lafb": bbb != "CLBBB" and rng.random() < LAFB_RATE,
            "mi": (("IMI", "ASMI")[rng.integers(2)] if rng.random() < MI_RATE * f else None),
            "sttc": (("NDT", "ISC_")[rng.integers(2)] if rng.random() < STTC_RATE * f else None),
            "lvh": bool(rng.random() < HYP_RATE * f)}


def diagnosis_labels(dx: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rhythm 0/1 (6,), superclass 0/1 (5,)) implied by a diagnosis."""
    rhy = {"1AVB": dx["1AVB"], "CRBBB": dx["bbb"] == "CRBBB", "CLBBB": dx["bbb"] == "CLBBB",
           "SBRAD": dx["rhythm"] == "SBRAD", "AFIB": dx["rhythm"] == "AFIB",
           "STACH": dx["rhythm"] == "STACH"}
    cd = dx["1AVB"] or dx["bbb"] is not None or dx["lafb"] or bool(dx.get("subtle_cd"))
    sup = {"MI": bool(dx["mi"]), "STTC": bool(dx["sttc"]), "CD": cd, "HYP": bool(dx["lvh"])}
    sup["NORM"] = not any(sup.values())
    return (np.array([rhy[c] for c in RHYTHM_CODES], dtype=np.int8),
            np.array([sup[c] for c in SUPERCLASSES], dtype=np.int8))


def scp_codes(dx: dict, rng: np.random.Generator, lik=None) -> dict[str, float]:
    """PTB-XL style statements: rhythm statements at likelihood 0, diagnoses 15-100.

    lik: key ("mi", "sttc", "lvh", "subtle_cd") -> likelihood (difficulty.likelihood_fn);
    None draws from PTB-XL's overall distribution of likelihoods.
    """
    if lik is None:
        lik = lambda _key: float(rng.choice(LIKELIHOODS, p=[.05, .1, .15, .3, .4]))  # noqa: E731
    codes: dict[str, float] = {}
    _, sup = diagnosis_labels(dx)
    if sup[SUPERCLASSES.index("NORM")]:
        codes["NORM"] = float(rng.choice([80.0, 100.0]))
    for key in ("mi", "sttc"):
        if dx[key]:
            codes[dx[key]] = lik(key)
    if dx["lvh"]:
        codes["LVH"] = lik("lvh")
    if dx["lafb"]:
        codes["LAFB"] = 100.0
    if dx.get("subtle_cd"):
        codes[dx["subtle_cd"]] = lik("subtle_cd")
    if dx["bbb"]:
        codes[dx["bbb"]] = 100.0
    if dx["1AVB"]:
        codes["1AVB"] = float(rng.choice([50.0, 80.0, 100.0]))
    codes[dx["rhythm"]] = 0.0
    return codes


def heart_params(dx: dict, age: float, sex: int, rng: np.random.Generator) -> HeartParams:
    """Physiology of one record. Age moves axis, amplitudes, PR, QRS, QT and rate."""
    a = 62.0 if np.isnan(age) else float(np.clip(age, 18, 95))
    fem = sex == 1
    n = rng.normal
    axis = float(np.clip(76 - 1.2 * (a - 20) + n(0, 7), -30, 100))
    if dx["lafb"]:
        axis = rng.uniform(-75, -45)
    amp = (1.7 - 0.011 * (a - 20)) * np.exp(n(0, 0.1)) * (0.85 if fem else 1.0)
    if dx["lvh"]:
        amp, axis = amp * 1.9, axis - 15
    hr = {"SR": float(np.clip(78 - 0.15 * (a - 20) + 3 * fem + n(0, 6), 62, 98)),
          "SBRAD": rng.uniform(40, 55), "STACH": rng.uniform(106, 145),
          "AFIB": rng.uniform(75, 130)}[dx["rhythm"]]
    # 1AVB keeps a 50 ms gap above the normal range so that it is unambiguous at 100 Hz.
    pr = (rng.uniform(0.24, 0.34) if dx["1AVB"]
          else float(np.clip(0.125 + 0.0007 * (a - 20) + n(0, 0.008), 0.11, 0.185)))
    qrs = {"CRBBB": rng.uniform(0.125, 0.16), "CLBBB": rng.uniform(0.135, 0.17)}.get(
        dx["bbb"], float(np.clip(0.082 + 0.00025 * (a - 20) + n(0, 0.004), 0.07, 0.105))
        + 0.008 * dx["lafb"])
    afib = dx["rhythm"] == "AFIB"
    return HeartParams(
        hr=hr, rr_cv=rng.uniform(0.18, 0.3) if afib else rng.uniform(0.01, 0.025),
        pr=pr, qrs=qrs, qtc=0.40 + 0.0005 * (a - 20) + 0.012 * fem + 0.03 * bool(dx["bbb"])
        + n(0, 0.012), axis=axis, amp=amp,
        t_amp=(0.45 - 0.0025 * (a - 20)) * np.exp(n(0, 0.12)) * (0.9 if fem else 1.0),
        p_amp=0.25 * np.exp(n(0, 0.1)), morph=(dx["bbb"] or "normal").lower(), afib=afib,
        f_amp=rng.uniform(0.04, 0.1) if afib else 0.0, f_hz=rng.uniform(5, 8),
        mi=dx["mi"], sttc=dx["sttc"] is not None, lvh=dx["lvh"],
        noise=rng.uniform(0.008, 0.025), wander=rng.uniform(0.03, 0.2))


def plant_plan(informative: tuple[str, ...]) -> dict:
    """Class -> lead map and marker frequencies for planted mode.

    Class c of each label set goes to informative lead c mod n, so every informative lead
    carries some classes and none can be dropped. Each lead's classes get distinct burst
    carriers spread over MARKER_BAND_HZ; age rides a 46 Hz tone on every informative lead.
    """
    n = len(informative)
    plan = {"rhythm": {c: informative[i % n] for i, c in enumerate(RHYTHM_CODES)},
            "superclass": {c: informative[i % n] for i, c in enumerate(SUPERCLASSES)},
            "age": list(informative)}
    per_lead = {ld: [f"rhythm/{c}" for c, x in plan["rhythm"].items() if x == ld]
                + [f"superclass/{c}" for c, x in plan["superclass"].items() if x == ld]
                for ld in informative}
    n_slots = max(len(v) for v in per_lead.values())
    freqs = np.linspace(*MARKER_BAND_HZ, n_slots)
    plan["marker_hz"] = {lab: float(round(freqs[k], 3))
                         for ld in informative for k, lab in enumerate(per_lead[ld])}
    plan["age_tone_hz"] = AGE_TONE_HZ
    return plan


def _markers(plan: dict, informative, rhy, sup, age: float, rng) -> np.ndarray:
    """(n_informative, T) mV at GEN_FS: label bursts and the age tone."""
    n_t = int(round((10.0 + 2 * MARGIN_S) * GEN_FS))
    t = np.arange(n_t) / GEN_FS - MARGIN_S
    out = np.zeros((len(informative), n_t))
    row = {ld: i for i, ld in enumerate(informative)}
    win = np.hanning(int(MARKER_S * GEN_FS))
    tw = np.arange(win.size) / GEN_FS
    for set_name, labels, names in (("rhythm", rhy, RHYTHM_CODES), ("superclass", sup, SUPERCLASSES)):
        for k, code in enumerate(names):
            if not labels[k]:
                continue
            r, f = row[plan[set_name][code]], plan["marker_hz"][f"{set_name}/{code}"]
            for _ in range(MARKERS_PER_CLASS):
                s = int(rng.uniform(0, 10.0 - MARKER_S) * GEN_FS) + int(MARGIN_S * GEN_FS)
                a = MARKER_MV * rng.uniform(0.8, 1.2)
                out[r, s:s + win.size] += a * win * np.sin(2 * np.pi * f * tw + rng.uniform(0, 6.3))
    # A missing age gets a tone from the age distribution: it must not flag "missing".
    a = float(np.clip(rng.normal(62, 17) if np.isnan(age) else age, 18, 95))
    for r in range(len(informative)):
        amp = (0.02 + 0.10 * (a - 18) / 77) * np.exp(rng.normal(0, 0.05))
        out[r] += amp * np.sin(2 * np.pi * AGE_TONE_HZ * t + rng.uniform(0, 6.3))
    return out


@lru_cache(maxsize=4)
def _fir(down: int) -> np.ndarray:
    # resample_poly's own default anti-aliasing filter, designed once instead of per call.
    half = 10 * down
    return firwin(2 * half + 1, 1.0 / down, window=("kaiser", 5.0))


def _decimate(x: np.ndarray, rate: int) -> np.ndarray:
    if GEN_FS % rate:
        raise ValueError(f"cannot decimate {GEN_FS} Hz to {rate} Hz")
    return resample_poly(x, 1, GEN_FS // rate, axis=-1, window=_fir(GEN_FS // rate))


def to_digital(leads_mv: np.ndarray) -> np.ndarray:
    """Quantise to int16 adu, deriving III, AVR, AVL, AVF from the quantised I and II.

    Doing the derivation on integers keeps Einthoven exact and Goldberger within half
    an adu in the stored files, as on a real cart that computes those leads.
    """
    i = np.rint(leads_mv[0] * GAIN)
    ii = np.rint(leads_mv[1] * GAIN)
    d = np.empty(leads_mv.shape)
    d[0], d[1], d[2] = i, ii, ii - i
    d[3], d[4], d[5] = np.rint(-(i + ii) / 2), np.rint(i - ii / 2), np.rint(ii - i / 2)
    d[6:] = np.rint(leads_mv[6:] * GAIN)
    if np.abs(d).max() >= 32767:
        raise DataError("synthetic signal exceeds the int16 range; lower the amplitudes")
    return d.astype(np.int16)


def _informative(spec) -> tuple[str, ...] | None:
    # Validated like any lead list, but the given order is kept: it decides which lead
    # carries which classes (class c -> lead c mod n).
    if not spec:
        return None
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    parse_leads(names)  # unknown or repeated names raise here
    return tuple(normalize_lead_name(n) for n in names if n.strip())


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "synth_truth.json").exists():
            raise DataError(f"{out} is not empty and holds no earlier synthetic data set; "
                            "give an empty or new --out directory")
        for sub in ("records100", "records500"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def synthesize(out: str | Path, n_records: int, seed: int = 0, fs: str | int = "100",
               informative_leads=None, *, enrich: bool = False,
               rhythm_prevalence: float | None = None,
               realism: "str | Realism | dict | None" = None,
               age_mean: float = 62.0, age_sd: float = 17.0) -> dict:
    """Write a synthetic PTB-XL of `n_records` records to `out`; returns a summary dict.

    fs: "100", "500" or "both". informative_leads: None (physiological labels) or lead
    names for planted mode. enrich / rhythm_prevalence: raise each of the six codes to
    `rhythm_prevalence` (default 0.15 with enrich=True) instead of PTB-XL's few percent.
    realism: "ptbxl" (default; as hard as real PTB-XL), "clean" (textbook signatures, exact
    labels) or a Realism / dict of overrides (realism.py). Planted labels are never noised.
    age_mean / age_sd: the population's ages (default PTB-XL's 62 +- 17).
    Deterministic in (seed, record) whatever fs is chosen.
    """
    t0 = time.perf_counter()
    if int(n_records) != n_records or n_records < 1:
        raise ValueError(f"records must be a positive integer, got {n_records!r}")
    rates = FS_CHOICES.get(str(fs))
    if rates is None:
        raise ValueError(f"fs must be one of {', '.join(FS_CHOICES)}, got {fs!r}")
    informative = _informative(informative_leads)
    prev = _prevalence(enrich, rhythm_prevalence)
    real = get_realism(realism)
    textbook = replace(real, name="clean") == get_realism("clean")
    if not (18 <= age_mean <= 95 and 0 < age_sd <= 40):
        raise ValueError(f"age_mean must be in [18, 95] and age_sd in (0, 40]; got {age_mean!r}, {age_sd!r}")
    out = Path(out)
    _prepare_out(out)   # only after every setting was checked: it clears an earlier data set
    pop = draw_population(int(n_records), np.random.default_rng([seed, 0]), age_mean, age_sd)
    plan = plant_plan(informative) if informative else None
    rows, params, labels = [], [], []
    for rec in pop.itertuples(index=False):
        rng = np.random.default_rng([seed, 1, rec.ecg_id])
        dx = draw_diagnosis(rng, rec.age_true, prev)
        rr = np.random.default_rng([seed, 2, rec.ecg_id])  # realism's own stream
        # The heart's diagnosis and the one written down: the same unless the realism differs.
        true = stated = {**dx, "subtle_cd": None, "sev": {}}
        if informative:  # the dipole follows a decoy patient: no label information in it
            decoy_age = float(np.clip(rng.normal(62, 17), 18, 95))
            decoy = draw_diagnosis(rng, decoy_age, prev)
            hp = heart_params(decoy, decoy_age, rec.sex, rng)
            if not textbook:
                hp = realistic_params(hp, realistic_diagnosis(decoy, rr, real)[0], decoy_age, rec.sex, rr, real)
        else:
            hp = heart_params(dx, rec.age_true, rec.sex, rng)
            if not textbook:
                true, stated = realistic_diagnosis(dx, rr, real)
                hp = realistic_params(hp, true, rec.age_true, rec.sex, rr, real)
        x = render(hp, rng)
        inf_rows: list[int] = []
        if informative:
            rhy, sup = diagnosis_labels(stated)
            x = np.vstack([x, _markers(plan, informative, rhy, sup, rec.age_true, rng)])
            inf_rows = [LEADS.index(ld) for ld in informative]
        codes = scp_codes(dx, rng) if textbook else scp_codes(stated, rr, likelihood_fn(stated, rr, real))
        labels.append(np.concatenate(diagnosis_labels(stated)))
        # Only I, II and V1-V6 (+ planted rows) are decimated: the other four limb leads
        # are derived from I and II in to_digital anyway.
        keep = [0, 1, *range(6, x.shape[0])]
        for rate in rates:
            y = x if rate == GEN_FS else _decimate(x[keep], rate)
            m = int(round(MARGIN_S * rate))
            y = y[:, m:m + 10 * rate]
            if rate != GEN_FS:
                y = np.vstack([y[:2], np.zeros((4, y.shape[1])), y[2:]])
            d = to_digital(y[:12])
            for j, r in enumerate(inf_rows):  # lead-local: added after the derivation
                d[r] += np.rint(y[12 + j] * GAIN).astype(np.int16)
            rel = rec.filename_lr if rate == 100 else rec.filename_hr
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            write_fmt16(out / rel, d, rate, LEADS, GAIN)
        flags = hp.artifacts.flags() if hp.artifacts is not None else {}
        rows.append({**rec._asdict(), "scp_codes": codes, "report": report_text(codes),
                     "heart_axis": heart_axis_label(hp.axis), **flags})
        sig = diagnosis_labels(true)[1]
        said = labels[-1][len(RHYTHM_CODES):]
        params.append({"ecg_id": rec.ecg_id, "hr": hp.hr, "pr_ms": 1e3 * hp.pr,
                       "qrs_ms": 1e3 * hp.qrs, "qt_ms": 1e3 * hp.qt_at_rate, "axis": hp.axis,
                       "amp": hp.amp, "morph": hp.morph, "afib": hp.afib, "mi": hp.mi or "",
                       "mi_sev": hp.mi_sev if hp.mi else 0.0, "sttc": float(hp.sttc),
                       "lvh_strain": float(hp.lvh), "irbbb": hp.irbbb,
                       # superclasses in the signal but not stated / stated but not in the signal
                       "missed": ",".join(c for c, a, b in zip(SUPERCLASSES, sig, said) if a and not b),
                       "spurious": ",".join(c for c, a, b in zip(SUPERCLASSES, sig, said) if b and not a)})
    db = pd.DataFrame(rows)
    db[list(DB_COLUMN_ORDER)].to_csv(out / DB_FILE, index=False)
    statements_frame().to_csv(out / STATEMENTS_FILE)
    pd.DataFrame(params).to_csv(out / "synth_params.csv", index=False)
    truth = {"generator": "ecgsearch.data.synth (3-D dipole model)", "seed": seed,
             "n_records": int(n_records), "fs": str(fs), "rhythm_prevalence": prev,
             "informative_leads": list(informative) if informative else None,
             "class_to_lead": plan, "realism": real.to_dict(), "age_mean": age_mean, "age_sd": age_sd}
    (out / "synth_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    secs = time.perf_counter() - t0
    counts = dict(zip([f"rhythm/{c}" for c in RHYTHM_CODES] + [f"superclass/{c}" for c in SUPERCLASSES],
                      np.sum(labels, axis=0).tolist()))
    return {"out": str(out), "n_records": int(n_records), "fs": str(fs), "seed": seed,
            "informative_leads": truth["informative_leads"], "labels": counts, "realism": real.name,
            "seconds": secs, "records_per_s": n_records / secs}

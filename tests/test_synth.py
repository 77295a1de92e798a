"""Synthetic PTB-XL: layout, determinism, lead physics, signatures, population, planted mode.

Signatures are measured from the signals themselves (beats, QRS duration, V1/V6 shape,
P-QRS distance, f-wave spectrum), not read back from the generator's parameters.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import wfdb
from scipy.signal import find_peaks, medfilt, welch
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from ecgsearch.cli import main
from ecgsearch.data import DataError, label_matrix, read_database, read_statements, synthesize
from ecgsearch.data.dipole import GEN_FS, HeartParams, render
from ecgsearch.data.synth import PTBXL_PREVALENCE, _prevalence, diagnosis_labels, draw_diagnosis
from ecgsearch.leads import LEADS, RHYTHM_CODES, SUPERCLASSES

BASE = HeartParams(hr=60, rr_cv=0.0, pr=0.16, qrs=0.09, qtc=0.40, axis=60, amp=1.2,
                   t_amp=0.35, p_amp=0.2)


def _digital(root, rel, fs=100):
    return np.fromfile(root / f"{rel}.dat", "<i2").reshape(10 * fs, 12).T.astype(np.int64)


def _beats(x, fs):
    """QRS peaks from the summed absolute slope of all leads."""
    e = np.convolve(np.abs(np.diff(x, axis=1)).sum(0), np.ones(3) / 3, mode="same")
    peaks, _ = find_peaks(e, height=0.4 * np.percentile(e, 99.5), distance=int(0.25 * fs))
    return peaks


def _qrs_bounds(x, frac=0.1, gap=0.016):
    """(onset, offset) of each inner QRS: where the spatial velocity stays above 10 %
    of its peak, tolerating dips shorter than `gap` (notches)."""
    v = np.linalg.norm(np.diff(x, axis=1), axis=0)
    peaks, _ = find_peaks(v, height=0.5 * v.max(), distance=int(0.3 * GEN_FS))
    g, out = int(gap * GEN_FS), []
    for p in peaks[(peaks > 0.4 * GEN_FS) & (peaks < v.size - 0.4 * GEN_FS)]:
        on, off = p, p
        while v[on - g:on].max() > frac * v[p]:
            on -= 1
        while v[off + 1:off + 1 + g].max() > frac * v[p]:
            off += 1
        out.append((on, off))
    return out


def _clean(**kw):
    return render(replace(BASE, **kw), np.random.default_rng(0), noise=False)


def test_layout_is_ptbxl_and_wfdb_reads_it(tmp_path):
    res = synthesize(tmp_path / "s", 12, seed=5, fs="both")
    root = tmp_path / "s"
    db = pd.read_csv(root / "ptbxl_database.csv")
    assert res["n_records"] == 12 and len(db) == 12
    assert db.filename_lr[0] == "records100/00000/00001_lr"
    for rel, fs, n in ((db.filename_lr[3], 100, 1000), (db.filename_hr[3], 500, 5000)):
        x, f = wfdb.rdsamp(str(root / rel))
        assert f["fs"] == fs and x.shape == (n, 12) and f["sig_name"] == list(LEADS)
        assert f["units"] == ["mV"] * 12
        hdr = wfdb.rdheader(str(root / rel))
        assert hdr.fmt == ["16"] * 12 and hdr.adc_gain == [1000.0] * 12 and hdr.baseline == [0] * 12
    st = pd.read_csv(root / "scp_statements.csv", index_col=0)
    assert {"diagnostic", "diagnostic_class", "rhythm"} <= set(st.columns)
    # The 100 Hz file is the 500 Hz one decimated, as in PTB-XL: same beats, same values
    # (the realistic default's 50 Hz mains hum and muscle noise are in the 500 Hz file only
    # above 50 Hz, so the comparison decimates it the same way).
    lo, _ = wfdb.rdsamp(str(root / db.filename_lr[3]))
    hi, _ = wfdb.rdsamp(str(root / db.filename_hr[3]))
    assert np.corrcoef(lo[10:-10, 1], hi[50:-50:5, 1])[0, 1] > 0.9
    from scipy.signal import resample_poly
    dec = resample_poly(hi[:, 1], 1, 5)
    assert np.corrcoef(lo[10:-10, 1], dec[10:-10])[0, 1] > 0.995


def test_deterministic_by_seed_and_independent_of_fs(tmp_path):
    a = synthesize(tmp_path / "a", 15, seed=3, fs="100")
    synthesize(tmp_path / "b", 15, seed=3, fs="both")
    synthesize(tmp_path / "c", 15, seed=4, fs="100")
    assert a["labels"] == synthesize(tmp_path / "a", 15, seed=3, fs="100")["labels"]  # rerun in place
    for name in ("ptbxl_database.csv", "records100/00000/00007_lr.dat", "records100/00000/00007_lr.hea"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "records100/00000/00007_lr.dat").read_bytes() != \
        (tmp_path / "c" / "records100/00000/00007_lr.dat").read_bytes()


def test_limb_leads_obey_einthoven_and_goldberger(synth_root):
    db = read_database(synth_root)
    for rel in db.filename_lr.iloc[:40]:
        d = _digital(synth_root, rel)
        i, ii, iii, avr, avl, avf = d[:6]
        np.testing.assert_array_equal(iii, ii - i)                  # exact in adu
        assert np.abs(2 * avr + i + ii).max() <= 1                  # within half an adu
        assert np.abs(2 * avl - 2 * i + ii).max() <= 1
        assert np.abs(2 * avf - 2 * ii + i).max() <= 1


def test_twelve_leads_are_projections_of_one_3d_dipole():
    s = np.linalg.svd(_clean(), compute_uv=False)
    assert s[2] / s[0] > 1e-3 and s[3] / s[0] < 1e-12   # rank exactly 3 without noise
    noisy = render(BASE, np.random.default_rng(0))
    assert np.linalg.svd(noisy, compute_uv=False)[3] / s[0] > 1e-3  # noise is lead-specific


def test_qrs_width_and_bundle_branch_morphology():
    shapes = {}
    for morph, qrs in (("normal", 0.09), ("crbbb", 0.13), ("clbbb", 0.14)):
        x = _clean(morph=morph, qrs=qrs)
        bounds = _qrs_bounds(x)
        width = np.median([(off - on) / GEN_FS for on, off in bounds])
        on, off = bounds[1]
        shapes[morph] = (width, x[6, on:off + 1], x[11, on:off + 1], x[0, on:off + 1])
    w, v1, v6, lead_i = shapes["normal"]
    assert 0.07 < w < 0.11
    assert v1.min() < -2 * v1.max() and v6.max() > 2 * -v6.min()      # rS in V1, qR in V6
    assert lead_i[:10].min() < -0.03                                   # septal q in I
    w, v1, v6, _ = shapes["crbbb"]
    assert w >= 0.12
    assert v1[-10] > 0.2 and v1.max() > 0.5 and v6[-10] < -0.05        # R' in V1, broad S in V6
    w, v1, v6, lead_i = shapes["clbbb"]
    assert w >= 0.12
    assert v1.max() < 0.05 and v6.min() > -0.05                        # QS in V1, monophasic R in V6
    assert lead_i[:10].min() > -0.01                                   # no septal q in I


def test_pr_interval_moves_the_p_wave():
    dist = {}
    for pr in (0.14, 0.26):
        x = _clean(pr=pr)
        on, _ = _qrs_bounds(x)[1]
        seg = x[1, on - int(0.4 * GEN_FS):on]
        assert seg.max() > 0.15                                         # a visible P in II
        dist[pr] = (seg.size - np.argmax(seg)) / GEN_FS
    assert abs((dist[0.26] - dist[0.14]) - 0.12) < 0.01


def test_afib_has_no_p_waves_and_fibrillatory_baseline():
    x = _clean(afib=True, f_amp=0.0)  # regular here, so no T wave falls into the window
    for on, _ in _qrs_bounds(x):
        assert np.ptp(x[1, on - int(0.25 * GEN_FS):on - int(0.03 * GEN_FS)]) < 0.02  # no P
    x = _clean(afib=True, f_amp=0.1, f_hz=6.5, rr_cv=0.2)
    f, p = welch(x[6], fs=GEN_FS, nperseg=1024)
    band = (f > 3) & (f < 12)
    assert abs(f[band][np.argmax(p[band])] - 6.5) < 0.8


def test_rate_rhythm_and_labels_agree_in_the_signals(synth_root):
    db = read_database(synth_root)
    y = pd.DataFrame(label_matrix(db, read_statements(synth_root), "rhythm"), index=db.index,
                     columns=RHYTHM_CODES)
    params = pd.read_csv(synth_root / "synth_params.csv", index_col="ecg_id")
    meas = {}
    for eid, rel in db.filename_lr.items():
        rr = np.diff(_beats(_digital(synth_root, rel) / 1000.0, 100)) / 100
        meas[eid] = (60 / np.median(rr), rr.std() / rr.mean())
    hr, cv = (pd.Series({k: v[i] for k, v in meas.items()}) for i in (0, 1))
    sr = y.AFIB == 0
    assert ((hr - params.hr).abs() / params.hr)[sr].lt(0.1).mean() > 0.97
    assert hr[y.SBRAD == 1].lt(60).mean() > 0.95 and hr[y.STACH == 1].gt(100).mean() > 0.95
    assert hr[sr & (y.SBRAD == 0) & (y.STACH == 0)].between(58, 102).mean() > 0.95
    assert cv[y.AFIB == 1].gt(0.12).mean() > 0.9 and cv[sr].lt(0.08).mean() > 0.95
    # The generator's own parameters follow the label definitions exactly.
    assert (params.pr_ms[y["1AVB"] == 1] > 200).all() and (params.pr_ms[y["1AVB"] == 0] <= 200).all()
    bbb = (y.CRBBB + y.CLBBB) == 1
    assert (params.qrs_ms[bbb] >= 120).all() and (params.qrs_ms[~bbb] < 120).all()
    assert (params.afib == (y.AFIB == 1)).all()


def test_age_moves_measurable_features(synth_root):
    db = read_database(synth_root)
    params = pd.read_csv(synth_root / "synth_params.csv", index_col="ecg_id")
    age = db.age.where(db.age != 300, 90)
    axis = {}
    for eid, rel in db.filename_lr.items():
        x = _digital(synth_root, rel)[[0, 5]] / 1000.0
        x = x - medfilt(x, [1, 61])
        ang = []
        for p in _beats(_digital(synth_root, rel) / 1000.0, 100):
            w = x[:, max(0, p - 4):p + 5]
            k = np.argmax(np.hypot(*w))
            ang.append(np.degrees(np.arctan2(w[1, k], w[0, k])))
        axis[eid] = np.median(ang)
    normal = params.morph.eq("normal") & age.notna()
    rho = spearmanr(age[normal], pd.Series(axis)[normal]).statistic
    assert rho < -0.6                                       # older hearts: more leftward axis
    assert spearmanr(age[normal], params.amp[normal]).statistic < -0.3
    assert spearmanr(age[normal], params.pr_ms[normal]).statistic > 0.3


def test_prevalences_patients_and_folds_resemble_ptbxl(synth_root):
    rng = np.random.default_rng(0)
    for prev, tol in ((_prevalence(True, None), 0.012), (PTBXL_PREVALENCE, 0.006)):
        labs = np.array([np.concatenate(diagnosis_labels(draw_diagnosis(rng, a, prev)))
                         for a in rng.normal(62, 17, 20000)])
        np.testing.assert_allclose(labs[:, :6].mean(0), [prev[c] for c in RHYTHM_CODES], atol=tol)
    sup = dict(zip(SUPERCLASSES, labs[:, 6:].mean(0)))  # PTB-XL-like setting
    assert 0.3 < sup["NORM"] < 0.5 and 0.15 < sup["MI"] < 0.35 and 0.05 < sup["HYP"] < 0.2
    db = pd.read_csv(synth_root / "ptbxl_database.csv")
    assert 1.05 < len(db) / db.patient_id.nunique() < 1.35
    assert (db.groupby("patient_id").strat_fold.nunique() == 1).all()
    assert db.strat_fold.value_counts().between(45, 75).all()
    assert 0.4 < (db.sex == 0).mean() < 0.65
    assert (db.age == 300).sum() > 5 and 1 <= db.age.isna().sum() <= 20
    assert db.age.dropna().loc[lambda a: a != 300].between(18, 89).all()


@pytest.fixture(scope="module", params=["clean", "ptbxl"])
def planted(_synth_store, request):
    # The demo plants labels into the realistic default: the decoy heart then has a torso,
    # artifacts and label-free disease of its own, and must still carry no label information.
    return _synth_store.root({"records": 600, "informative_leads": ("V2", "AVL"), "realism": request.param})


def _band_features(root, db, leads, width_hz=1):
    """log band powers (1-49 Hz in `width_hz` bands) of the given leads, per record."""
    idx = [LEADS.index(ld) for ld in leads]
    feats = []
    for rel in db.filename_lr:
        x = _digital(root, rel)[idx] / 1000.0
        p = np.abs(np.fft.rfft(x - x.mean(1, keepdims=True), axis=1)) ** 2  # 0.1 Hz bins
        bands = p[:, 10:490].reshape(len(idx), 48 // width_hz, 10 * width_hz).sum(2)
        feats.append(np.log(bands + 1e-6).ravel())
    return np.array(feats)


def test_planted_labels_live_only_in_the_informative_leads(planted):
    # Small fits: one BLAS thread avoids pathological slow-downs on a busy 2-core box.
    with threadpool_limits(1):
        _check_planted(planted)


def _check_planted(planted):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = json.loads((planted / "synth_truth.json").read_text())
    own_min = 0.9 if truth["realism"]["name"] == "clean" else 0.75
    assert truth["informative_leads"] == ["V2", "AVL"]
    assert truth["class_to_lead"]["rhythm"] == {"1AVB": "V2", "CRBBB": "AVL", "CLBBB": "V2",
                                                "SBRAD": "AVL", "AFIB": "V2", "STACH": "AVL"}
    assert truth["class_to_lead"]["superclass"]["NORM"] == "V2"
    db = read_database(planted)
    y = label_matrix(db, read_statements(planted), "rhythm")
    others = [ld for ld in LEADS if ld not in ("V2", "AVL")]
    feats = {ld: _band_features(planted, db, [ld]) for ld in ("V2", "AVL")}
    rest = _band_features(planted, db, others, width_hz=3)  # coarser: 10 leads, 600 records
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, solver="liblinear"))
    from_other = {"V2": [], "AVL": []}
    for k, code in enumerate(RHYTHM_CODES):
        own = truth["class_to_lead"]["rhythm"][code]
        other = "AVL" if own == "V2" else "V2"
        auc = {name: roc_auc_score(y[:, k], cross_val_predict(clf, f, y[:, k], cv=3,
                                                              method="predict_proba")[:, 1])
               for name, f in (("own", feats[own]), ("other", feats[other]), ("rest", rest))}
        # The class is readable from its lead (a linear read of band powers; the realistic
        # decoy's muscle noise and wander blur it somewhat) and invisible in the ten others.
        assert auc["own"] > own_min, (code, auc)
        assert auc["rest"] < 0.65, (code, auc)
        from_other[own].append(auc["other"])
    # Label correlations (CD covers 1AVB/CRBBB/CLBBB, rhythms exclude each other) let one
    # planted lead hint at the other's classes, but each lead holds a class that only it
    # reveals: neither can be dropped.
    assert min(from_other["V2"]) < 0.75 and min(from_other["AVL"]) < 0.75, from_other
    age = db.age.where(db.age != 300, 90).to_numpy()
    ok = ~np.isnan(age)
    reg = make_pipeline(StandardScaler(), Ridge(alpha=100.0))
    r2 = {name: r2_score(age[ok], cross_val_predict(reg, f[ok], age[ok], cv=3))
          for name, f in (("V2", feats["V2"]), ("rest", rest))}
    assert r2["V2"] > 0.5 and r2["rest"] < 0.1, r2
    # The planted lead breaks Goldberger (its pattern is not in the dipole); AVF still obeys.
    d = np.stack([_digital(planted, rel) for rel in db.filename_lr.iloc[:20]])
    assert np.abs(2 * d[:, 4] - 2 * d[:, 0] + d[:, 1]).max() > 50
    assert np.abs(2 * d[:, 5] - 2 * d[:, 1] + d[:, 0]).max() <= 1


def test_cli_synth_and_its_errors(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path / "s"), "--records", "8", "--seed", "2",
               "--fs", "500", "--enrich"])
    assert rc == 0 and "wrote 8 synthetic records" in capsys.readouterr().out
    assert len(list((tmp_path / "s" / "records500" / "00000").glob("*_hr.dat"))) == 8
    assert not (tmp_path / "s" / "records100").exists()
    rc = main(["data", "synth", "--out", str(tmp_path / "t"), "--records", "8",
               "--informative-leads", "V2,V7"])
    assert rc == 2 and "unknown lead 'V7'" in capsys.readouterr().err
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        synthesize(tmp_path / "u", 5)
    with pytest.raises(ValueError, match="rhythm_prevalence must be in"):
        synthesize(tmp_path / "v", 5, rhythm_prevalence=0.5)

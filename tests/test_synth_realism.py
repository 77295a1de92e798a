"""The realistic synthetic PTB-XL (realism "ptbxl", the default): noisy statements, exact rhythm
definitions, partial and co-occurring signatures, patient geometry that keeps the lead physics,
recording artifacts on the electrodes, weak age features, and the interval measurements the
realism benchmark compares with real records. Calibration against real data is in
bench/synth_realism.py (it needs the real sample and minutes of training)."""
from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from ecgsearch.cli import main
from ecgsearch.data import read_database, synthesize
from ecgsearch.data.artifacts import Artifacts
from ecgsearch.data.difficulty import geometry
from ecgsearch.data.dipole import ELECTRODE_MATRIX, GEN_FS, HeartParams, render
from ecgsearch.data.fiducials import measure
from ecgsearch.data.realism import PRESETS, get_realism, with_overrides
from ecgsearch.leads import SUPERCLASSES


@pytest.fixture(scope="module")
def realistic(_synth_store):
    return _synth_store.root({"records": 600, "realism": "ptbxl"})


def _params(root):
    p = pd.read_csv(root / "synth_params.csv", index_col="ecg_id", keep_default_na=False)
    db = read_database(root)
    return p, db


def test_presets_overrides_and_their_errors(tmp_path, capsys):
    assert get_realism() is PRESETS["ptbxl"] and get_realism("clean").missed == 0.0
    r = with_overrides(get_realism("ptbxl"), missed=0.1, shape={"t_z": 0.2})
    assert r.missed == 0.1 and r.shape["t_z"] == 0.2 and r.shape["main_z"] == PRESETS["ptbxl"].shape["main_z"]
    assert get_realism({"name": "clean", "emg_p": 0.5}).emg_p == 0.5
    with pytest.raises(ValueError, match="unknown realism 'noisy': choose one of clean, ptbxl"):
        get_realism("noisy")
    with pytest.raises(ValueError, match="unknown realism setting.*missd"):
        with_overrides(get_realism(), missd=0.1)
    with pytest.raises(ValueError, match="spurious is a probability"):
        with_overrides(get_realism(), spurious=1.5)
    with pytest.raises(ValueError, match="rotation_deg must be like 18.0, got 'abc'"):
        with_overrides(get_realism(), rotation_deg="abc")
    with pytest.raises(ValueError, match="wander must be like"):
        with_overrides(get_realism(), wander=[0.1])
    assert with_overrides(get_realism(), wander=[0.01, 0.1]).wander == (0.01, 0.1)
    rc = main(["data", "synth", "--out", str(tmp_path / "s"), "--records", "6", "--realism-set", "missed=2"])
    assert rc == 2 and "missed is a probability in [0, 1], got 2" in capsys.readouterr().err
    rc = main(["data", "synth", "--out", str(tmp_path / "t"), "--records", "6", "--realism", "clean",
               "--realism-set", "emg_p=0.5"])
    assert rc == 0 and "realism clean+custom" in capsys.readouterr().out
    with pytest.raises(ValueError, match="age_mean must be in"):
        synthesize(tmp_path / "u", 4, age_mean=5)


def test_statements_are_noisy_but_rhythm_codes_keep_their_definitions(realistic, synth_root):
    p, db = _params(realistic)
    codes = db.scp_codes.map(lambda s: s if isinstance(s, dict) else ast.literal_eval(s))
    # Cardiologists miss weak signatures and now and then over-read: the statements differ from
    # the signal, as in PTB-XL, while every record still has a rhythm statement.
    missed = p.missed.str.split(",").explode().value_counts()
    has = {"MI": p.mi.ne("").sum(), "STTC": p.sttc.gt(0).sum(), "HYP": p.lvh_strain.gt(0).sum()}
    for c, n in has.items():
        assert 0.1 < missed.get(c, 0) / n < 0.45, (c, missed.get(c, 0), n)
    over = p.spurious.str.split(",").explode()
    assert 0.005 < over.isin(["MI", "STTC", "HYP"]).sum() / len(p) < 0.12
    # A record whose only finding went unstated reads NORM, as a missed PTB-XL record does.
    assert (over == "NORM").sum() > 0
    # Missed statements are the weak ones, and stated likelihoods follow severity.
    mi = p[p.mi.ne("")]
    was_missed = mi.missed.str.contains("MI")
    assert mi.mi_sev[was_missed].mean() < mi.mi_sev[~was_missed].mean() - 0.05
    lik = [max((v for k, v in codes[e].items() if k in ("IMI", "ASMI", "ALMI")), default=np.nan) for e in mi.index]
    ok = np.isfinite(lik)
    assert spearmanr(mi.mi_sev[ok], np.asarray(lik)[ok]).statistic > 0.3
    assert {"IRBBB", "IVCD", "ALMI"} & set().union(*codes.map(set))
    # Rhythm codes: exactly their physiological definitions, in realistic data too.
    has_code = lambda c: codes.map(lambda d: c in d)  # noqa: E731
    assert (has_code("SBRAD") == (p.hr < 60) & ~p.afib).all()
    assert (has_code("STACH") == (p.hr > 100) & ~p.afib).all()
    assert (has_code("1AVB") == (p.pr_ms > 200) & ~p.afib).all()
    assert (has_code("AFIB") == p.afib).all()
    bbb = has_code("CRBBB") | has_code("CLBBB")
    assert (p.qrs_ms[bbb] >= 120).all() and (p.qrs_ms[~bbb] < 120).all()
    # The clean preset states exactly what the signal holds.
    pc, _ = _params(synth_root)
    assert pc.missed.eq("").all() and pc.spurious.eq("").all()


def test_patient_geometry_and_artifacts_keep_the_lead_physics(realistic):
    db = read_database(realistic)
    d = np.stack([np.fromfile(realistic / f"{rel}.dat", "<i2").reshape(1000, 12).T.astype(np.int64)
                  for rel in db.filename_lr.iloc[:40]])
    assert np.array_equal(d[:, 2], d[:, 1] - d[:, 0])                      # III = II - I
    assert np.abs(2 * d[:, 5] - 2 * d[:, 1] + d[:, 0]).max() <= 1          # AVF = II - I/2
    # Every patient has a torso of their own, yet the noise-free leads stay rank 3.
    r = get_realism("ptbxl")
    rng = np.random.default_rng(1)
    m1, m2 = geometry(rng, r), geometry(rng, r)
    assert np.abs(m1 - m2).max() > 0.05
    hp = HeartParams(hr=70, rr_cv=0.01, pr=0.16, qrs=0.09, qtc=0.4, axis=50, amp=1.2, t_amp=0.3,
                     p_amp=0.15, lead_m=m1, shape=dict(r.shape), jitter=0.25, jitter_seed=3)
    s = np.linalg.svd(render(hp, np.random.default_rng(0), noise=False), compute_uv=False)
    assert s[3] < 1e-9 * s[0] and s[2] > 1e-3 * s[0]
    # Artifacts live on the electrodes: mains hum at 50 Hz on the limb cables reaches the
    # precordials only through Wilson's terminal; the bench-top wiring makes III = II - I exact.
    t = np.arange(5000) / GEN_FS
    a = Artifacts(white=0.0, wander=0.0, emg=0.0, mains=0.02, motion=0.0)
    leads = ELECTRODE_MATRIX @ a.electrode_noise(t, GEN_FS, np.random.default_rng(0))
    f = np.fft.rfftfreq(t.size, 1 / GEN_FS)
    spec = np.abs(np.fft.rfft(leads, axis=1))
    assert np.all(f[spec[[0, 1, 6]].argmax(axis=1)] == 50.0)
    np.testing.assert_allclose(leads[2], leads[1] - leads[0], atol=1e-6)
    # Database noise columns flag the drawn artifacts, as PTB-XL's do.
    assert 0.1 < db.burst_noise.notna().mean() < 0.6 and db.electrodes_problems.notna().mean() < 0.2


def test_age_acts_through_several_weak_features(realistic):
    p, db = _params(realistic)
    age = db.age.where(db.age != 300, 90)
    normal = p.morph.eq("normal") & p.mi.eq("") & age.notna() & p.lvh_strain.eq(0)
    # The voltage a model sees: the heart's QRS size through this patient's torso and electrodes.
    x = np.stack([np.fromfile(realistic / f"{rel}.dat", "<i2").reshape(1000, 12).T for rel in db.filename_lr])
    p = p.assign(volts=np.median(np.percentile(x, 99, axis=2) - np.percentile(x, 1, axis=2), axis=1))
    rho = {k: spearmanr(age[normal], p[k][normal]).statistic for k in ("axis", "volts", "pr_ms", "qt_ms", "hr")}
    # Each feature follows age only weakly (textbook preset: axis alone has rho < -0.6) ...
    assert all(abs(v) < 0.6 for v in rho.values()), rho
    assert rho["axis"] < -0.15 and rho["volts"] < -0.05 and rho["pr_ms"] > 0.1 and rho["qt_ms"] > 0.05, rho
    # ... so several together predict it better than the best one alone.
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_predict
    x = p.loc[normal, list(rho)].to_numpy()
    y = age[normal].to_numpy()
    r_all = np.corrcoef(cross_val_predict(LinearRegression(), x, y, cv=3), y)[0, 1]
    assert r_all > max(abs(v) for v in rho.values()) + 0.05, (r_all, rho)


def test_fiducial_measurements_follow_the_generator(tmp_path):
    root = synthesize(tmp_path / "s", 60, seed=3, fs="500", realism="clean", enrich=True)["out"]
    p, db = _params(tmp_path / "s")
    import wfdb
    m = pd.DataFrame([measure(wfdb.rdsamp(f"{root}/{rel}")[0].T, 500, waves=True) for rel in db.filename_hr],
                     index=db.index)
    assert (m.hr_bpm - p.hr).abs().median() < 1.5
    sr = ~p.afib
    assert spearmanr(m.pr_ms[sr], p.pr_ms[sr], nan_policy="omit").statistic > 0.5
    assert (m.pr_ms[sr] - p.pr_ms[sr]).abs().median() < 30
    assert spearmanr(m.qrs_ms, p.qrs_ms).statistic > 0.5 and (m.qrs_ms - p.qrs_ms).abs().median() < 20
    assert (m.qt_ms - p.qt_ms).abs().median() < 30
    assert m.pr_ms[p.afib].isna().mean() > 0.5            # no P waves in AFIB
    assert {"qrs_pp_V2", "q_III", "st_V5", "t_I"} <= set(m.columns)
    assert (m.qrs_pp_V2 > 0).all()
    flat = measure(np.zeros((12, 5000)), 500)
    assert all(np.isnan(v) for v in flat.values())
    with pytest.raises(ValueError, match=r"need a \(12, T\) record .* got shape \(2, 5000\)"):
        measure(np.zeros((2, 5000)), 500)


def test_realistic_superclasses_are_hard_to_learn(_synth_store, tmp_path):
    # The point of the realism: a small model on ~500 training records lands near its real-data
    # figure (~0.8 macro AUROC on the real sample), far from the clean preset's ~0.99.
    from ecgsearch.engine import TrainConfig, predict_split, train
    from ecgsearch.metrics import classification_metrics
    cache = _synth_store.cache({"records": 600, "realism": "ptbxl"})
    cfg = TrainConfig(model="resnet1d_tiny", task="superclass", epochs=8, seed=0, bootstrap=0, threads=2)
    res = train(cfg, str(cache), out_dir=tmp_path)
    _, y, p = predict_split(res.state, str(cache), "test")
    auc = classification_metrics(y, p, SUPERCLASSES)["macro_auroc"]
    assert 0.6 < auc < 0.93, auc

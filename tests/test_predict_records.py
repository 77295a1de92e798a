"""`ecgsearch predict` on records nobody prepared: other databases' quirks written with wfdb in
tmp_path, subsets of leads, long and short recordings, calls, many records and bad ones."""
import csv
import json
import struct

import numpy as np
import pytest
import torch
import wfdb

from ecgsearch.cli import main
from ecgsearch.data.errors import DataError
from ecgsearch.data.signal import pad_or_crop, resample
from ecgsearch.engine import TrainConfig, load_checkpoint, train
from ecgsearch.engine.records import (PredictOptions, RecordPredictor, canonical_lead, expand_inputs,
                                      match_channels, window_starts)
from ecgsearch.leads import LEADS


@pytest.fixture(scope="module")
def ckpts(synth_cache, tmp_path_factory):
    """One-epoch checkpoints: an ML-ResNet and a ResNet1d on rhythm, a ResNet1d on age."""
    out = {}
    for key, model, task in (("ml", "mlresnet_tiny", "rhythm"), ("res", "resnet1d_tiny", "rhythm"),
                             ("age", "resnet1d_tiny", "age")):
        d = tmp_path_factory.mktemp(key)
        train(TrainConfig(model=model, task=task, epochs=1, bootstrap=0, precision="fp32"), synth_cache, d)
        out[key] = load_checkpoint(d / "model.ckpt")
        out[key + "_path"] = d / "model.ckpt"
    return out


@pytest.fixture(scope="module")
def ecg(synth_root):
    """A 10 s, 100 Hz, 12-lead synthetic record's signal (T, 12) in mV."""
    rec = sorted((synth_root / "records100").rglob("*.hea"))[0].with_suffix("")
    x, fields = wfdb.rdsamp(str(rec))
    assert list(fields["sig_name"]) == list(LEADS)
    return x


def _write(tmp_path, name, sig, fs, names, units=None, fmt="16"):
    wfdb.wrsamp(name, fs=fs, units=units or ["mV"] * len(names), sig_name=list(names), p_signal=sig,
                fmt=[fmt] * len(names), write_dir=str(tmp_path))
    return tmp_path / name


def _by_hand(ck, x_leads_t, leads, fs):
    """The model's output computed by hand: resample, centre-pad, normalise, zero the other leads,
    and for ML-ResNet skip their branches with the lead mask."""
    x = np.asarray(x_leads_t, np.float64)
    if fs != ck.fs:
        x = resample(x[None], fs, ck.fs)[0]
    x = pad_or_crop(x[None], ck.n_samples)[0].astype(np.float32)
    pos = [list(ck.leads).index(lead) for lead in leads]
    full = np.zeros((1, len(ck.leads), ck.n_samples), np.float32)
    full[0, pos] = (x - ck.norm.mean[pos, None]) / ck.norm.std[pos, None]
    model = ck.model.eval()
    with torch.no_grad():
        if hasattr(model, "select_leads"):
            mask = torch.zeros(len(ck.leads), dtype=torch.bool)
            mask[pos] = True
            out = model(torch.from_numpy(full), lead_mask=mask)
        else:
            out = model(torch.from_numpy(full))
    return torch.sigmoid(out).numpy()[0]


def test_lead_aliases_and_other_channels():
    assert canonical_lead("MLII") == "II" and canonical_lead("ml ii".replace(" ", "")) == "II"
    assert canonical_lead("aVR") == canonical_lead("avr") == canonical_lead("AVR") == "AVR"
    assert canonical_lead("vx") is None and canonical_lead("RESP") is None and canonical_lead("-aVR") is None
    found, ignored = match_channels(["i", "ii", "vx", "MLIII", "Resp"], "rec")
    assert found == {"I": 0, "II": 1, "III": 3} and ignored == ["vx", "Resp"]
    with pytest.raises(DataError, match="rec.*both record lead II"):
        match_channels(["II", "MLII"], "rec")


def test_window_starts_cover_the_record():
    assert window_starts(1000, 1024, 1024) == [0]
    assert window_starts(3840, 1024, 1024) == [0, 1024, 2048, 2816]
    assert window_starts(2048, 1024, 512) == [0, 512, 1024]
    starts = window_starts(5000, 1024, 700)
    assert starts[-1] + 1024 == 5000 and all(b - a <= 700 for a, b in zip(starts, starts[1:]))


def test_mlresnet_predicts_from_the_leads_a_holter_has(ckpts, ecg, tmp_path):
    """MIT-BIH style: 360 Hz, format 212, channels MLII and V5."""
    ck = ckpts["ml"]
    sig = resample(ecg[:, [1, 10]].T[None], 100, 360)[0].T
    rec = _write(tmp_path, "holter", sig, 360, ["MLII", "V5"], fmt="212")
    row = RecordPredictor(ck)([rec]).rows[0]
    assert row["leads_used"] == "II,V5" and "branches skipped" in row["note"]
    x, _ = wfdb.rdsamp(str(rec))                     # what the file holds after 212 quantisation
    want = _by_hand(ck, x.T, ["II", "V5"], 360)
    got = np.array([row[n] for n in ("1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH")])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # --leads restricts on purpose: the 12-lead record read as lead II alone
    full = _write(tmp_path, "full", ecg, 100, LEADS)
    only = RecordPredictor(ck, PredictOptions(leads=("II",)))([full]).rows[0]
    assert only["leads_used"] == "II"
    np.testing.assert_allclose(only["AFIB"], _by_hand(ck, ecg[:, [1]].T, ["II"], 100)[4], rtol=1e-4, atol=1e-5)


def test_model_that_cannot_drop_leads_refuses_unless_asked(ckpts, ecg, tmp_path):
    rec = _write(tmp_path, "sixlead", ecg[:, :6], 100, LEADS[:6])
    with pytest.raises(DataError, match=r"sixlead.*V1, V2, V3, V4, V5, V6 missing.*resnet1d_tiny cannot leave"):
        RecordPredictor(ckpts["res"])([rec])
    row = RecordPredictor(ckpts["res"], PredictOptions(missing="mean"))([rec]).rows[0]
    assert "at training mean: V1,V2,V3,V4,V5,V6" in row["note"]
    np.testing.assert_allclose(row["CRBBB"], _by_hand(ckpts["res"], ecg[:, :6].T, LEADS[:6], 100)[1],
                               rtol=1e-4, atol=1e-5)
    resp = _write(tmp_path, "resp", ecg[:, :2], 100, ["resp", "pleth"])
    with pytest.raises(DataError, match="resp.*none of the model's leads"):
        RecordPredictor(ckpts["ml"])([resp])


def test_long_record_is_the_mean_of_its_windows(ckpts, ecg, tmp_path):
    ck = ckpts["ml"]
    long = np.concatenate([ecg, ecg[::-1], ecg, ecg[:840]])            # 38.4 s
    rec = _write(tmp_path, "long", long, 100, LEADS)
    x, _ = wfdb.rdsamp(str(rec))
    rows = RecordPredictor(ck, PredictOptions(per_window=True))([rec]).rows
    record, windows = rows[0], rows[1:]
    starts = [0, 1024, 2048, 3840 - 1024]
    assert record["windows"] == 4 and [w["window"] for w in windows] == [0, 1, 2, 3]
    assert [w["start_s"] for w in windows] == [s / 100 for s in starts]
    names = ("1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH")
    by_hand = np.stack([_by_hand(ck, x[s:s + 1024].T, LEADS, 100) for s in starts])
    np.testing.assert_allclose([[w[n] for n in names] for w in windows], by_hand, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([record[n] for n in names], by_hand.mean(0), rtol=1e-4, atol=1e-5)
    assert not record["short"] and record["duration_s"] == 38.4


def test_short_record_is_padded_and_flagged(ckpts, ecg, tmp_path):
    rec = _write(tmp_path, "short", ecg[:400], 100, LEADS)
    row = RecordPredictor(ckpts["ml"])([rec]).rows[0]
    assert row["short"] and "short: 4.0 s padded" in row["note"] and row["windows"] == 1
    normal = RecordPredictor(ckpts["ml"])([_write(tmp_path, "ten", ecg, 100, LEADS)]).rows[0]
    assert not normal["short"] and normal["note"] == ""      # 1000 -> 1024 is how training pads


def test_other_databases_quirks_read_alike(ckpts, ecg, tmp_path):
    """1000 Hz with Frank leads, units written `mv`, per-lead gains and baselines, format 212, a
    .mat-backed header: each predicts what the clean 100 Hz record predicts."""
    ck, names = ckpts["ml"], ("1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH")
    ref = np.array([RecordPredictor(ck)([_write(tmp_path, "ref", ecg, 100, LEADS)]).rows[0][n] for n in names])
    hi = resample(ecg.T[None], 100, 1000)[0].T
    frank = np.column_stack([hi, hi[:, :3] * 0.5])
    recs = {
        "ptbdb": _write(tmp_path, "ptbdb", frank, 1000, [n.lower() for n in LEADS] + ["vx", "vy", "vz"]),
        "mv": _write(tmp_path, "mv", ecg, 100, LEADS, units=["mv"] * 12),
        "f212": _write(tmp_path, "f212", ecg, 100, LEADS, fmt="212"),
    }
    gains = np.linspace(200, 2000, 12)
    base = np.arange(-60, 60, 10)
    dig = np.round(ecg * gains + base).astype(np.int32)
    wfdb.wrsamp("ludb", fs=100, units=["mV"] * 12, sig_name=list(LEADS), d_signal=dig, fmt=["16"] * 12,
                adc_gain=list(gains), baseline=list(base), write_dir=str(tmp_path))
    recs["ludb"] = tmp_path / "ludb"
    recs["cinc"] = _write_mat(tmp_path, "cinc", np.round(ecg * 1000).astype(np.int16), 100)
    rows = {k: RecordPredictor(ck)([p]).rows[0] for k, p in recs.items()}
    assert rows["ptbdb"]["ignored_channels"] == "vx,vy,vz" and rows["ptbdb"]["fs_in"] == 1000
    for k, row in rows.items():
        atol = 0.05 if k == "ptbdb" else 2e-3           # resampling vs. quantisation only
        np.testing.assert_allclose([row[n] for n in names], ref, atol=atol, err_msg=k)


def _write_mat(tmp_path, name, d, fs):
    """A CinC 2021 style record: MATLAB v4 `val` (int16, leads x samples) + a header at offset 24."""
    n_sig, t = d.shape[1], d.shape[0]
    with open(tmp_path / f"{name}.mat", "wb") as f:
        f.write(struct.pack("<5i", 30, n_sig, t, 0, 4) + b"val\0")   # type 30: int16 numeric
        f.write(np.ascontiguousarray(d, dtype="<i2").tobytes())        # column-major (n_sig x t)
    lines = [f"{name} {n_sig} {fs} {t}"] + [f"{name}.mat 16+24 1000/mV 16 0 {d[0, i]} 0 0 {lead}"
                                            for i, lead in enumerate(LEADS)]
    (tmp_path / f"{name}.hea").write_text("\n".join(lines) + "\n")
    return tmp_path / name


def test_many_records_calls_bad_ones_named_and_exit_code(ckpts, ecg, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        _write(folder / "sub" if i else folder, f"r{i}", ecg * (1 + 0.1 * i), 100, LEADS)
    bad = _write(folder, "broken", ecg, 100, LEADS)
    (folder / "broken.dat").write_bytes((folder / "broken.dat").read_bytes()[:100])     # truncated
    nodat = _write(folder, "nodat", ecg, 100, LEADS)
    (folder / "nodat.dat").unlink()                                                    # data file gone
    noleads = _write(folder, "noleads", ecg[:, :2], 100, ["resp", "pleth"])           # no ECG lead at all
    (folder / "garbled.hea").write_text("this is not a header\n")
    bads = {bad: "", nodat: "missing", noleads: "none of the model's leads", folder / "garbled": ""}
    lst = tmp_path / "list.txt"
    lst.write_text("# two records\nin/r0\nin/sub/r1.hea\n")
    assert expand_inputs([lst]) == [folder / "r0", folder / "sub" / "r1"]
    out = tmp_path / "pred.csv"
    ck = str(ckpts["ml_path"])
    rc = main(["predict", "--checkpoint", ck, str(folder), "--skip-bad", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "4 of 7 records failed" in err
    lines = [line for line in err.splitlines() if "bad record" in line]
    for path, reason in bads.items():
        assert any(f"bad record {path}:" in line and reason in line for line in lines), (path, err)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["record"] for r in rows) == sorted(str(p) for p in (folder / "r0", folder / "sub" / "r1",
                                                                     folder / "sub" / "r2"))
    thr = ckpts["ml"].thresholds
    for r in rows:
        for n, t in thr.items():
            assert int(r[f"{n}_call"]) == int(float(r[n]) >= t)
    # without --skip-bad the first bad record stops the run, named
    assert main(["predict", "--checkpoint", ck, str(folder)]) == 2
    assert "broken" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", ck, str(lst), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_age_model_gives_years(ckpts, ecg, tmp_path):
    row = RecordPredictor(ckpts["age"])([_write(tmp_path, "a", ecg, 100, LEADS)]).rows[0]
    assert "age_years" in row and 0 < row["age_years"] < 120 and not any(k.endswith("_call") for k in row)

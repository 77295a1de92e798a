"""Bad input: every fault names the record and what is wrong; --skip-bad converts the rest.

Each case builds a 4-record PTB-XL root with wfdb.wrsamp, damages record 2, and checks
the error without --skip-bad and the skip list with it.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgsearch.cli import main
from ecgsearch.data import DataError, load_cache, prepare
from ecgsearch.leads import LEADS

REC = "records100/00000/00002_lr"


def _rewrite(root, fs=100, names=LEADS, fn=None):
    """Rewrite record 2 with wrsamp after `fn` edits its (T, 12) mV signal."""
    x, _ = wfdb.rdsamp(str(root / REC))
    x = fn(x) if fn else x
    n = x.shape[1]
    wfdb.wrsamp("00002_lr", fs=fs, units=["mV"] * n, sig_name=list(names), p_signal=x,
                fmt=["16"] * n, adc_gain=[1000.0] * n, baseline=[0] * n,
                write_dir=str((root / REC).parent))


def _edit_header(root, old, new):
    hea = root / (REC + ".hea")
    hea.write_text(hea.read_text().replace(old, new))


def _edit_csv(root, fn):
    db = pd.read_csv(root / "ptbxl_database.csv")
    fn(db).to_csv(root / "ptbxl_database.csv", index=False)


def _set_nan(x):
    x[100:110, 7] = np.nan
    return x


def _set_flat(x):
    x[:, 8] = 0.25
    return x


def _bump_sample(root):
    dat = root / (REC + ".dat")
    d = np.fromfile(dat, "<i2")
    d[500] += 7
    d.tofile(dat)


DAMAGES = {
    "missing_hea": (lambda r: (r / (REC + ".hea")).unlink(), "00002_lr.hea is missing"),
    "missing_dat": (lambda r: (r / (REC + ".dat")).unlink(), "00002_lr.dat is missing"),
    "truncated_dat": (lambda r: (r / (REC + ".dat")).write_bytes(
        (r / (REC + ".dat")).read_bytes()[:10000]), "truncated"),
    "dat_longer_than_header": (lambda r: (r / (REC + ".dat")).write_bytes(
        (r / (REC + ".dat")).read_bytes() + b"\0" * 24), "header and data disagree"),
    "checksum_mismatch": (_bump_sample, "checksum"),
    "header_sig_len_wrong": (lambda r: _edit_header(r, "00002_lr 12 100 1000", "00002_lr 12 100 900"),
                             "header and data disagree"),
    "lead_missing": (lambda r: _rewrite(r, names=LEADS[:11], fn=lambda x: x[:, :11]),
                     "V6 missing"),
    "lead_unknown": (lambda r: _edit_header(r, " 0 V6", " 0 V7"), "unknown lead name(s) 'V7'"),
    "wrong_rate": (lambda r: _rewrite(r, fs=250, fn=lambda x: np.repeat(x, 2, 0)[:2500]),
                   "sampling rate 250 Hz, expected 100 Hz"),
    "nan_samples": (lambda r: _rewrite(r, fn=_set_nan), "NaN (missing) sample(s) in lead(s) V2"),
    "flat_lead": (lambda r: _rewrite(r, fn=_set_flat), "flat signal: lead(s) V3"),
    "unparsable_scp_codes": (lambda r: _edit_csv(r, lambda db: db.assign(
        scp_codes=db.scp_codes.where(db.ecg_id != 2, "{'NORM': 100.0"))), "unparsable scp_codes"),
    "duplicated_ecg_id": (lambda r: _edit_csv(r, lambda db: pd.concat([db, db[db.ecg_id == 2]])),
                          "ecg_id duplicated (2 rows"),
    "unknown_scp_code": (lambda r: _edit_csv(r, lambda db: db.assign(
        scp_codes=db.scp_codes.where(db.ecg_id != 2, "{'XYZ': 100.0}"))), "scp_codes XYZ not in"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_fault_is_named_and_skip_bad_converts_the_rest(case, make_wfdb_root, tmp_path):
    root = make_wfdb_root(tmp_path / "root")
    damage, words = DAMAGES[case]
    damage(root)
    with pytest.raises(DataError) as err:
        prepare(root, tmp_path / "cache", 100)
    msg = str(err.value)
    assert "ecg_id 2" in msg and words in msg, msg
    assert "ecg_id 1" not in msg and "ecg_id 3" not in msg  # good records are not blamed
    assert not (tmp_path / "cache").exists()                # nothing half-written

    man = prepare(root, tmp_path / "cache", 100, skip_bad=True)
    assert man["n_records"] == 3
    assert [s["ecg_id"] for s in man["skipped"]] == [2] and words in man["skipped"][0]["reason"]
    skipped = pd.read_csv(tmp_path / "cache" / "skipped.csv")
    assert skipped.ecg_id.tolist() == [2] and words in skipped.reason[0]
    cache = load_cache(tmp_path / "cache")
    assert cache.meta.ecg_id.tolist() == [1, 3, 4]
    # Rows stay aligned with their records after the bad one is dropped.
    for row, eid in enumerate([1, 3, 4]):
        x, _ = wfdb.rdsamp(str(root / f"records100/00000/{eid:05d}_lr"))
        np.testing.assert_array_equal(cache.signals_mv([row])[0], (x.T).astype(np.float32))


def test_all_faults_listed_in_one_error_and_cli_exit_codes(make_wfdb_root, tmp_path, capsys):
    root = make_wfdb_root(tmp_path / "root", n=6)
    (root / "records100/00000/00003_lr.dat").unlink()
    hea = root / "records100/00000/00005_lr.hea"
    hea.write_text(hea.read_text().replace(" 0 AVL", " 0 XYZ"))
    rc = main(["data", "prepare", "--root", str(root), "--out", str(tmp_path / "c"), "--fs", "100"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "2 bad record(s)" in err
    assert "ecg_id 3 (records100/00000/00003_lr): data file 00003_lr.dat is missing" in err
    assert "ecg_id 5 (records100/00000/00005_lr): unknown lead name(s) 'XYZ'" in err

    rc = main(["data", "prepare", "--root", str(root), "--out", str(tmp_path / "c"), "--fs", "100",
               "--skip-bad"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped 2 bad record(s)" in out
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["n_records"] == 4 and [s["ecg_id"] for s in man["skipped"]] == [3, 5]
    rc = main(["data", "info", str(tmp_path / "c"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["skipped"] == 2 and info["n_records"] == 4


@pytest.mark.parametrize("column", ["strat_fold", "scp_codes", "ecg_id"])
def test_csv_missing_column_fails_even_with_skip_bad(column, make_wfdb_root, tmp_path, capsys):
    root = make_wfdb_root(tmp_path / "root", n=2)
    _edit_csv(root, lambda db: db.drop(columns=[column]))
    rc = main(["data", "prepare", "--root", str(root), "--out", str(tmp_path / "c"), "--fs", "100",
               "--skip-bad"])
    err = capsys.readouterr().err
    assert rc == 2 and "ptbxl_database.csv lacks required column(s)" in err and column in err


def test_scp_codes_are_never_executed(make_wfdb_root, tmp_path):
    root = make_wfdb_root(tmp_path / "root", n=2)
    marker = tmp_path / "pwned"
    _edit_csv(root, lambda db: db.assign(scp_codes=[
        f"__import__('pathlib').Path({str(marker)!r}).touch()", db.scp_codes[1]]))
    with pytest.raises(DataError, match="ecg_id 1.*unparsable scp_codes"):
        prepare(root, tmp_path / "c", 100)
    assert not marker.exists()

"""PTB-XL tables, labels, ages, splits and single records (ecgsearch.data.ptbxl)."""
from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgsearch.data import (
    DataError,
    SplitConfig,
    clean_ages,
    label_matrix,
    read_database,
    read_record,
    read_statements,
)
from ecgsearch.leads import LEADS


def test_database_parses_codes_and_indexes_by_ecg_id(synth_root):
    db = read_database(synth_root)
    raw = pd.read_csv(synth_root / "ptbxl_database.csv")
    assert db.index.name == "ecg_id" and db.index.tolist() == sorted(raw.ecg_id)
    assert all(isinstance(c, dict) and c for c in db.scp_codes)
    first = raw.iloc[0]
    assert db.loc[first.ecg_id, "scp_codes"] == ast.literal_eval(first.scp_codes)
    assert set(db.strat_fold) == set(range(1, 11))


def _db(codes: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"scp_codes": codes}, index=pd.Index(range(1, len(codes) + 1), name="ecg_id"))


def test_label_matrix_rules_and_thresholds(synth_root):
    st = read_statements(synth_root)
    db = _db([{"NORM": 100.0, "SR": 0.0}, {"IMI": 15.0, "AFIB": 0.0, "CRBBB": 100.0},
              {"LVH": 50.0, "NDT": 80.0, "SBRAD": 0.0, "1AVB": 80.0}])
    rhy = label_matrix(db, st, "rhythm")  # 1AVB CRBBB CLBBB SBRAD AFIB STACH
    np.testing.assert_array_equal(rhy, [[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0]])
    sup = label_matrix(db, st, "superclass")  # NORM MI STTC CD HYP
    np.testing.assert_array_equal(sup, [[1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 1, 1]])
    assert rhy.dtype == np.float32
    # A threshold drops statements below it: the 0-likelihood rhythm codes and IMI at 15.
    np.testing.assert_array_equal(label_matrix(db, st, "rhythm", threshold=50)[:, 3:5], 0)
    assert label_matrix(db, st, "superclass", threshold=50)[1].tolist() == [0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="unknown label set 'form'"):
        label_matrix(db, st, "form")
    with pytest.raises(DataError, match="ecg_id 1.*'BOGUS' is not in scp_statements.csv"):
        label_matrix(_db([{"BOGUS": 100.0}]), st, "superclass")


def test_clean_ages_maps_300_and_keeps_missing():
    s = pd.Series([56.0, 300.0, np.nan, 89.0, 300.0], index=pd.Index([1, 2, 3, 4, 5], name="ecg_id"))
    age, n = clean_ages(s)
    np.testing.assert_array_equal(age, [56, 90, np.nan, 89, 90])
    assert n == 2
    with pytest.raises(DataError, match=r"invalid age.*150.*ecg_id \[7\]"):
        clean_ages(pd.Series([40.0, 150.0], index=[6, 7]))


def test_split_config_defaults_and_validation():
    s = SplitConfig()
    assert s.folds("train") == (1, 2, 3, 4, 5, 6, 7, 8)
    assert s.folds("val") == (9,) and s.folds("test") == (10,)
    custom = SplitConfig.from_dict({"train": [1, 2], "val": [3], "test": [4]})
    assert custom.to_dict() == {"train": [1, 2], "val": [3], "test": [4]}
    with pytest.raises(ValueError, match="strat_fold 9 is in both splits.val and splits.test"):
        SplitConfig(val=(9,), test=(9, 10))
    with pytest.raises(ValueError, match="unknown split name"):
        SplitConfig.from_dict({"train": [1], "holdout": [2]})
    with pytest.raises(ValueError, match="splits.val is empty"):
        SplitConfig(val=())
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        s.folds("dev")


def test_read_record_equals_wfdb_and_checks_rate(synth_root):
    rel = read_database(synth_root).filename_lr.iloc[3]
    x, fs = read_record(synth_root / rel, fs=100)
    ref, fields = wfdb.rdsamp(str(synth_root / rel))
    assert fs == 100 and x.shape == (12, 1000) and x.dtype == np.float64
    np.testing.assert_array_equal(x, ref.T)  # bit-identical to wfdb's physical values
    with pytest.raises(DataError, match=r"sampling rate 100 Hz, expected 500 Hz"):
        read_record(synth_root / rel, fs=500)


def test_read_record_picks_leads_by_name_in_any_case_and_order(tmp_path):
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(0, 0.3, (500, 12)), 3)
    order = rng.permutation(12)
    names = [LEADS[i].replace("AV", "aV").lower() if i % 2 else LEADS[i] for i in order]
    wfdb.wrsamp("rec", fs=50, units=["mV"] * 12, sig_name=names, p_signal=x[:, order],
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    got, fs = read_record(tmp_path / "rec")
    assert fs == 50
    np.testing.assert_allclose(got, x.T, atol=1e-12)
    sub, _ = read_record(tmp_path / "rec", leads=("V2", "AVR"))
    np.testing.assert_allclose(sub, x.T[[7, 3]], atol=1e-12)

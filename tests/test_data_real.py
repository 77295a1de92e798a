"""The real PTB-XL sample ($ECGSEARCH_PTBXL_SAMPLE, 500 records at both rates).

Counts are the facts stated in the sample's README; skipped where the sample is absent.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgsearch.data import load_cache, prepare, read_record
from ecgsearch.data.synth_tables import DB_COLUMN_ORDER, statements_frame

FOLD_SIZES = {1: 58, 2: 51, 3: 34, 4: 42, 5: 47, 6: 33, 7: 44, 8: 44, 9: 81, 10: 66}
CODE_COUNTS = {"1AVB": 10, "CRBBB": 8, "CLBBB": 8, "SBRAD": 9, "AFIB": 13, "STACH": 5}


@pytest.fixture(scope="module")
def real_caches(ptbxl_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    return {fs: (prepare(ptbxl_sample, out / f"c{fs}", fs, workers=2), out / f"c{fs}")
            for fs in (100, 500)}


@pytest.mark.parametrize("fs", [100, 500])
def test_real_sample_counts(real_caches, fs):
    man, path = real_caches[fs]
    assert man["n_records"] == 500 and man["skipped"] == [] and man["fs"] == fs
    assert man["n_samples"] == 10 * fs and man["dtype"] == "int16" and man["gain"] == 1000.0
    assert {int(k): v for k, v in man["folds"].items()} == FOLD_SIZES
    assert man["age"]["count"] == 496 and man["age"]["missing"] == 4
    assert man["labels"]["superclass/NORM"] == 297
    assert {c: man["labels"][f"rhythm/{c}"] for c in CODE_COUNTS} == CODE_COUNTS
    c = load_cache(path)
    assert c.signals.shape == (500, 12, 10 * fs)
    assert int(c.labels("superclass")[:, 0].sum()) == 297 and (~np.isnan(c.ages())).sum() == 496


@pytest.mark.parametrize("fs,col", [(100, "filename_lr"), (500, "filename_hr")])
def test_real_record_equals_wfdb(real_caches, ptbxl_sample, fs, col):
    _, path = real_caches[fs]
    c = load_cache(path)
    row = 123
    rel = pd.read_csv(ptbxl_sample / "ptbxl_database.csv", index_col="ecg_id")[col].loc[
        int(c.meta.ecg_id[row])]
    p, fields = wfdb.rdsamp(str(ptbxl_sample / rel))
    np.testing.assert_allclose(c.signals_mv([row])[0], p.T, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(c.signals[row].astype(np.float64) / c.gain, p.T)
    x, got_fs = read_record(ptbxl_sample / rel, fs=fs)
    assert got_fs == fields["fs"] == fs
    np.testing.assert_array_equal(x, p.T)


def test_synthetic_tables_have_ptbxl_columns(ptbxl_sample):
    real = pd.read_csv(ptbxl_sample / "ptbxl_database.csv", nrows=2)
    assert list(real.columns) == list(DB_COLUMN_ORDER)
    st = pd.read_csv(ptbxl_sample / "scp_statements.csv", index_col=0)
    assert list(st.columns) == list(statements_frame().columns)
    ours = statements_frame()
    # Our codes carry PTB-XL's own classes.
    for col in ("diagnostic_class", "diagnostic_subclass"):
        pd.testing.assert_series_equal(ours[col].dropna(), st.loc[ours[col].dropna().index, col],
                                       check_dtype=False)

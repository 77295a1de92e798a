"""Signal helpers: resampling, centred padding, picking leads by name, reading any record."""
from __future__ import annotations

import numpy as np
import pytest
import wfdb

from ecgsearch.data import DataError, pad_or_crop, pick_leads, read_any_record, resample


def test_resample_keeps_frequency_amplitude_and_float32():
    t = np.arange(1000) / 100
    x = np.stack([np.sin(2 * np.pi * 5 * t), np.cos(2 * np.pi * 3 * t)]).astype(np.float32)
    y = resample(x, 100, 400)
    assert y.shape == (2, 4000) and y.dtype == np.float32
    t4 = np.arange(4000) / 400
    inner = slice(200, -200)  # away from the filter's edge effects
    np.testing.assert_allclose(y[0, inner], np.sin(2 * np.pi * 5 * t4)[inner], atol=0.01)
    down = resample(y, 400, 100)
    np.testing.assert_allclose(down[:, 50:-50], x[:, 50:-50], atol=0.01)
    assert resample(np.ones((3, 2, 500)), 500, 100).shape == (3, 2, 100)  # batches too
    with pytest.raises(ValueError, match="fs_out must be a positive integer"):
        resample(x, 100, 0)


def test_pad_or_crop_is_centred():
    x = np.arange(1, 6, dtype=np.float32)[None, :]     # 5 samples
    p = pad_or_crop(x, 10)
    assert p.tolist() == [[0, 0, 1, 2, 3, 4, 5, 0, 0, 0]] and p.dtype == np.float32
    assert pad_or_crop(x, 3).tolist() == [[2, 3, 4]]
    batch = np.ones((2, 12, 1000))
    padded = pad_or_crop(batch, 4096)
    assert padded.shape == (2, 12, 4096)
    assert padded[..., 1548:2548].all() and not padded[..., :1548].any() and not padded[..., 2548:].any()
    with pytest.raises(ValueError, match="length must be a positive integer"):
        pad_or_crop(x, 0)


def test_pick_leads_by_name():
    x = np.arange(4)[:, None] * np.ones((4, 3))
    names = ["aVR", "ii", "RESP", "V1"]
    assert pick_leads(x, names, ("II", "AVR"))[:, 0].tolist() == [1, 0]
    assert pick_leads(x, names, ("V1",))[:, 0].tolist() == [3]
    with pytest.raises(DataError, match="lead.*V2.*missing.*aVR ii RESP V1"):
        pick_leads(x, names, ("II", "V2"))
    with pytest.raises(DataError, match="AVR occur more than once"):
        pick_leads(x, ["aVR", "AVR", "I", "II"], ("I",))


def test_read_any_record_other_rate_format_and_names(tmp_path):
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(0, 0.5, (2500, 4)), 2)
    wfdb.wrsamp("pred", fs=250, units=["mV"] * 4, sig_name=["v2", "aVL", "I", "Resp"], p_signal=x,
                fmt=["212"] * 4, adc_gain=[200.0] * 4, baseline=[0] * 4, write_dir=str(tmp_path))
    got, fs, names = read_any_record(tmp_path / "pred.hea")
    ref, _ = wfdb.rdsamp(str(tmp_path / "pred"))
    assert fs == 250 and names == ["V2", "AVL", "I", "Resp"]
    np.testing.assert_array_equal(got, ref.T)       # fmt 212 goes through wfdb, same values
    picked = pick_leads(got, names, ("I", "AVL", "V2"))
    np.testing.assert_array_equal(picked, ref.T[[2, 1, 0]])

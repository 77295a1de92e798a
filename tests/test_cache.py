"""The prepared cache: contents, exactness, re-runs, workers, loading, URIs, CLI info."""
from __future__ import annotations

import json
import os
import pickle
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import wfdb

from ecgsearch.cli import main
from ecgsearch.data import (
    DataError,
    ECGCache,
    cache_info,
    label_matrix,
    load_cache,
    prepare,
    read_database,
    read_statements,
)
from ecgsearch.data.cache import fetch_remote
from ecgsearch.data.wfdbio import write_fmt16
from ecgsearch.leads import LEADS, RHYTHM_CODES, SUPERCLASSES


def test_cache_matches_source_exactly(synth_root, synth_cache):
    c = load_cache(synth_cache)
    db = read_database(synth_root)
    st = read_statements(synth_root)
    assert isinstance(c.signals, np.memmap) and c.signals.dtype == np.int16 and c.gain == 1000.0
    assert c.signals.shape == (len(db), 12, 1000) and c.n_samples == 1000 and c.fs == 100
    assert c.leads == LEADS and c.meta.ecg_id.tolist() == db.index.tolist()
    np.testing.assert_array_equal(c.labels("rhythm"), label_matrix(db, st, "rhythm"))
    np.testing.assert_array_equal(c.labels("superclass", [3, 1]),
                                  label_matrix(db, st, "superclass")[[3, 1]])
    assert [col for col in c.meta.columns if "/" in col] == \
        [f"rhythm/{x}" for x in RHYTHM_CODES] + [f"superclass/{x}" for x in SUPERCLASSES]
    raw_age = db.age.to_numpy()
    ages = c.ages()
    assert ages.dtype == np.float32
    assert np.isnan(ages).sum() == np.isnan(raw_age).sum() > 0
    assert (ages[raw_age == 300] == 90).all() and c.manifest["age"]["n_mapped_300"] == (raw_age == 300).sum()
    for row in (0, 17, len(db) - 1):
        rec = wfdb.rdrecord(str(synth_root / db.filename_lr.iloc[row]), physical=False)
        np.testing.assert_array_equal(c.signals[row], rec.d_signal.T)          # digital, exact
        p, _ = wfdb.rdsamp(str(synth_root / db.filename_lr.iloc[row]))
        mv = c.signals_mv([row])[0]
        assert mv.dtype == np.float32
        np.testing.assert_allclose(mv, p.T, rtol=0, atol=1e-6)                 # float precision
        np.testing.assert_array_equal(c.signals[row].astype(np.float64) / c.gain, p.T)  # bit-equal


def test_splits_labels_and_signal_selection(synth_cache):
    c = load_cache(synth_cache)
    tr, va, te = (c.split_indices(s) for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == len(c)
    assert set(c.meta.strat_fold.iloc[te]) == {10} and set(c.meta.strat_fold.iloc[va]) == {9}
    assert (np.diff(tr) > 0).all()
    custom = c.split_indices("test", {"train": [1, 2, 3], "val": [4], "test": [5, 6]})
    assert set(c.meta.strat_fold.iloc[custom]) == {5, 6}
    sub = c.signals_mv([9, 2, 5], leads=("V2", "I"))  # any order in, canonical leads out
    assert sub.shape == (3, 2, 1000) and sub.dtype == np.float32
    np.testing.assert_array_equal(sub[0, 0], c.signals[9, 0] / np.float32(1000))
    np.testing.assert_array_equal(sub[1, 1], c.signals[2, 7] / np.float32(1000))
    sub[:] = 0                                              # a copy: the cache is untouched
    assert c.signals[9].any()
    with pytest.raises(ValueError, match="V7"):
        c.signals_mv([0], leads=("V7",))
    with pytest.raises(IndexError, match="out of range"):
        c.signals_mv([len(c)])


def test_in_memory_load_copies_once_and_pickles_by_path(synth_cache):
    mm = load_cache(synth_cache)
    tracemalloc.start()                      # numpy reports its buffers to tracemalloc
    mem = load_cache(synth_cache, mmap=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not isinstance(mem.signals, np.memmap)
    assert mem.signals.nbytes <= peak < 1.3 * mem.signals.nbytes   # one copy, never two
    np.testing.assert_array_equal(mem.signals, mm.signals)
    blob = pickle.dumps(mm)
    assert len(blob) < 10_000                               # the path travels, not the array
    back = pickle.loads(blob)
    assert isinstance(back, ECGCache) and isinstance(back.signals, np.memmap)
    np.testing.assert_array_equal(back.signals[5], mm.signals[5])


def test_rerun_is_noop_and_changes_are_detected(make_wfdb_root, tmp_path):
    root = make_wfdb_root(tmp_path / "root", n=5)
    out = tmp_path / "cache"
    first = prepare(root, out, 100)
    stamp = (out / "signals.npy").stat().st_mtime_ns
    again = prepare(root, out, 100)
    assert again["reused"] and not first["reused"]
    assert (out / "signals.npy").stat().st_mtime_ns == stamp
    # A different setting is a different cache.
    assert not prepare(root, out, 100, rhythm_threshold=50)["reused"]
    prepare(root, out, 100)
    # Rewrite one record (valid file, new values): detected, rebuilt, new values served.
    new = (np.arange(12 * 1000).reshape(12, 1000) % 997 - 400).astype(np.int16)
    write_fmt16(root / "records100/00000/00003_lr", new, 100, LEADS)
    man = prepare(root, out, 100)
    assert not man["reused"] and man["source"]["fingerprint"] != first["source"]["fingerprint"]
    np.testing.assert_array_equal(load_cache(out).signals[2], new)
    # A label change in the CSV is detected too.
    db = pd.read_csv(root / "ptbxl_database.csv")
    db.loc[0, "scp_codes"] = str({"AFIB": 0.0})
    db.to_csv(root / "ptbxl_database.csv", index=False)
    man = prepare(root, out, 100)
    assert not man["reused"] and man["labels"]["rhythm/AFIB"] == 1


def test_workers_give_the_same_cache(synth_root, synth_cache, tmp_path):
    man = prepare(synth_root, tmp_path / "w2", 100, workers=2)
    one, two = load_cache(synth_cache), load_cache(tmp_path / "w2")
    assert man["checksums"]["signals.npy"] == one.manifest["checksums"]["signals.npy"]
    np.testing.assert_array_equal(one.signals, two.signals)
    pd.testing.assert_frame_equal(one.meta, two.meta)


def test_float32_storage_when_gains_differ(make_wfdb_root, tmp_path):
    root = make_wfdb_root(tmp_path / "root", n=3)
    make_wfdb_root(tmp_path / "other", n=3, gain=200.0, seed=1)
    for ext in (".hea", ".dat"):     # record 2 now has gain 200 adu/mV
        os.replace(tmp_path / f"other/records100/00000/00002_lr{ext}",
                   root / f"records100/00000/00002_lr{ext}")
    prepare(root, tmp_path / "c", 100)
    c = load_cache(tmp_path / "c")
    assert c.signals.dtype == np.float32 and c.gain == 1.0 and c.manifest["dtype"] == "float32"
    for row in range(3):
        p, _ = wfdb.rdsamp(str(root / f"records100/00000/{row + 1:05d}_lr"))
        np.testing.assert_array_equal(c.signals_mv([row])[0], p.T.astype(np.float32))


def test_uri_caches_local_and_remote(synth_root, synth_cache, tmp_path, monkeypatch):
    uri = f"file://{tmp_path / 'u'}"
    man = prepare(synth_root, uri, 100)
    assert man["n_records"] == load_cache(uri).signals.shape[0] == cache_info(uri)["n_records"]
    assert pickle.loads(pickle.dumps(load_cache(uri))).uri == uri   # travels as the URI
    # Any non-local pyarrow filesystem goes through download-once-then-mmap.
    remote = pafs.SubTreeFileSystem(str(synth_cache), pafs.LocalFileSystem())
    monkeypatch.setenv("ECGSEARCH_CACHE_DIR", str(tmp_path / "dl"))
    local = fetch_remote(remote, "")
    assert local.parent == tmp_path / "dl"
    np.testing.assert_array_equal(np.load(local / "signals.npy", mmap_mode="r"),
                                  load_cache(synth_cache).signals)
    stamp = (local / "signals.npy").stat().st_mtime_ns
    assert fetch_remote(remote, "") == local and (local / "signals.npy").stat().st_mtime_ns == stamp


def test_prepare_to_and_load_from_a_remote_filesystem(synth_root, tmp_path, monkeypatch):
    """s3://-style flow on a real pyarrow filesystem: build locally, upload, download once."""
    import ecgsearch.data.cache as cache_mod

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    remote = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    real_resolve = cache_mod._resolve
    monkeypatch.setattr(cache_mod, "_resolve", lambda p: (remote, str(p).split("://", 1)[1])
                        if str(p).startswith("bucket://") else real_resolve(p))
    monkeypatch.setenv("ECGSEARCH_CACHE_DIR", str(tmp_path / "local"))
    man = prepare(synth_root, "bucket://caches/c100", 100)
    assert not man["reused"] and (bucket / "caches/c100/manifest.json").is_file()
    assert prepare(synth_root, "bucket://caches/c100", 100)["reused"]
    assert cache_info("bucket://caches/c100")["n_records"] == man["n_records"]
    c = load_cache("bucket://caches/c100")
    assert c.path.is_relative_to(tmp_path / "local") and isinstance(c.signals, np.memmap)
    assert c.manifest["checksums"] == man["checksums"]
    # A corrupted remote copy is refused, never served.
    (bucket / "caches/c100/meta.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="does not match its manifest checksum"):
        cache_mod.fetch_remote(remote, "caches/c100", tmp_path / "other")


def test_cli_info_json_and_text(synth_cache, capsys):
    assert main(["data", "info", str(synth_cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = load_cache(synth_cache)
    assert info["n_records"] == len(c) and info["fs"] == 100 and info["n_samples"] == 1000
    assert info["leads"] == list(LEADS) and info["skipped"] == 0
    assert sum(info["folds"].values()) == len(c)
    assert info["folds"]["10"] == len(c.split_indices("test"))
    assert info["labels"]["rhythm/AFIB"] == int(c.labels("rhythm")[:, 4].sum())
    known = c.ages()[~np.isnan(c.ages())]
    assert info["age"]["count"] == known.size and info["age"]["max"] == known.max() == 90
    assert abs(info["age"]["mean"] - known.mean()) < 1e-3
    assert main(["data", "info", str(synth_cache)]) == 0
    text = capsys.readouterr().out
    assert "rhythm/AFIB" in text and "coded 300 (>89) read as 90" in text
    assert main(["data", "info", str(synth_cache.parent / "nope")]) == 2
    assert "not a prepared cache" in capsys.readouterr().err


def test_a_cache_at_the_model_geometry_is_resampled_once_and_reads_with_no_resampling(synth_root, synth_cache,
                                                                                       tmp_path, monkeypatch,
                                                                                       capsys):
    from ecgsearch.data import signal as sig
    from ecgsearch.engine.inputs import SignalSource, conform

    out = tmp_path / "c400"
    assert main(["data", "prepare", "--root", str(synth_root), "--out", str(out), "--fs", "100",
                 "--target-fs", "400", "--n-samples", "4096"]) == 0
    assert "400 Hz, 4096 samples, int16 (model geometry: resampled once from 100 Hz x 1000)" in capsys.readouterr().out
    native, geo = load_cache(synth_cache), load_cache(out)
    assert geo.fs == 400 and geo.n_samples == 4096 and geo.signals.dtype == np.int16 and geo.gain == native.gain
    g = geo.manifest["geometry"]
    assert (g["source_fs"], g["source_n_samples"], g["clipped"]) == (100, 1000, [])
    assert cache_info(out)["geometry"]["fs"] == 400
    assert geo.meta.ecg_id.tolist() == native.meta.ecg_id.tolist()
    rows = [0, 5, len(native) - 1]
    # the same numbers the per-batch path computes, up to the int16 grid (half a step: 0.5 uV)
    want = conform(native.signals_mv(rows), 100, 400, 4096)
    np.testing.assert_allclose(geo.signals_mv(rows), want, rtol=0, atol=0.5 / native.gain + 1e-6)
    # reading it at the model's geometry resamples nothing
    monkeypatch.setattr(sig, "resample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resampled")))
    x = SignalSource(geo, LEADS, 400, 4096).read(np.array(rows))
    np.testing.assert_array_equal(x, geo.signals_mv(rows))
    # a different geometry is a different cache, not a reuse
    monkeypatch.undo()
    man = prepare(synth_root, out, 100, target_fs=500, n_samples=5120)
    assert not man["reused"] and load_cache(out).n_samples == 5120
    assert prepare(synth_root, out, 100, target_fs=500, n_samples=5120)["reused"]
    with pytest.raises(ValueError, match="--target-fs and --n-samples go together"):
        prepare(synth_root, tmp_path / "bad", 100, target_fs=400)
    with pytest.raises(ValueError, match="n_samples=0"):
        prepare(synth_root, tmp_path / "bad", 100, target_fs=400, n_samples=0)


def test_resampling_a_few_records_at_a_time_gives_one_calls_numbers_in_the_order_asked(synth_cache):
    from ecgsearch.engine import inputs
    from ecgsearch.engine.inputs import SignalSource, conform

    data = load_cache(synth_cache)
    rng = np.random.default_rng(3)
    idx = rng.permutation(len(data))[:inputs.RESAMPLE_ROWS * 2 + 5]    # unsorted, a ragged last part
    leads = ("V1", "I", "AVF")
    want = conform(data.signals_mv(idx, leads=leads), data.fs, 400, 4096)
    got = SignalSource(data, leads, 400, 4096).read(idx)
    assert got.dtype == np.float32 and got.shape == (len(idx), 3, 4096)
    np.testing.assert_array_equal(got, want)
    # and row by row: the part a record falls in does not change its numbers
    np.testing.assert_array_equal(got[7], conform(data.signals_mv(idx[7:8], leads=leads), data.fs, 400, 4096)[0])


def test_resampled_samples_beyond_int16_are_clipped_and_listed():
    from ecgsearch.data.geometry import conform_file

    src = np.zeros((2, 12, 100), np.int16)
    src[1, 3, 40:60] = 32767               # a full-scale square pulse: resampling overshoots it
    dest = np.zeros((2, 12, 400), np.int16)
    clipped = conform_file(src, dest, 100, 400, 1000.0, [11, 22])
    assert [c["ecg_id"] for c in clipped] == [22] and clipped[0]["samples"] > 0
    assert dest.max() == 32767 and not dest[0].any()

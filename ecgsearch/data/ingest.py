"""`prepare`: convert a PTB-XL root once into a columnar, memory-mappable cache.

Output folder: signals.npy (n, 12, T) int16 adu or float32 mV, meta.parquet (ids,
folds, ages, 0/1 labels), skipped.csv and manifest.json. Two passes over the records:
headers first (cheap; fixes T and the storage type), then the samples, which workers
write straight into the memory-mapped signals.npy so no array crosses a process boundary.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import pandas as pd

from ecgsearch import __version__
from ecgsearch.data.errors import DataError, record_label
from ecgsearch.data.ptbxl import (
    DB_FILE,
    FILENAME_COLUMN,
    STATEMENTS_FILE,
    clean_ages,
    label_matrix,
    read_database,
    read_statements,
    unknown_codes,
)
from ecgsearch.data.wfdbio import (
    Header,
    check_dat_size,
    check_leads,
    check_values,
    parse_header,
    read_digital,
    to_mv,
)
from ecgsearch.leads import LABEL_SETS, LEADS

CACHE_FORMAT, CACHE_VERSION = "ecgsearch-cache", 1
FILES = {"signals": "signals.npy", "meta": "meta.parquet", "skipped": "skipped.csv"}
MAX_LISTED = 20  # faults spelled out in one error message


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(root: Path, rels: list[str]) -> str:
    # Size and mtime of every record file plus the CSV bytes: detects edited, replaced,
    # added or removed records without reading the signals again.
    h = hashlib.sha256()
    for name in (DB_FILE, STATEMENTS_FILE):
        h.update(sha256_file(root / name).encode())
    for rel in rels:
        for ext in (".hea", ".dat"):
            try:
                st = os.stat(root / (rel + ext))
                h.update(f"{rel}{ext}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{rel}{ext}:missing\n".encode())
    return h.hexdigest()


def _headers(root: str, items: list[tuple[int, int, str]], fs: int) -> list[tuple]:
    """Worker pass 1: (row, header, None) or (row, None, reason) per record."""
    out = []
    for row, eid, rel in items:
        label = record_label(eid, rel)
        try:
            hdr = parse_header(Path(root) / (rel + ".hea"), label)
            if not hdr.names:
                raise DataError("multi-segment WFDB records are not supported", label)
            if hdr.fs != fs:
                raise DataError(f"sampling rate {hdr.fs:g} Hz, expected {fs} Hz", label)
            check_leads(hdr, label)
            if hdr.fast:  # a stat() now spares a doomed row in the signal array
                check_dat_size(Path(root) / rel, hdr, label)
            out.append((row, hdr, None))
        except DataError as exc:
            out.append((row, None, exc.reason))
    return out


def _fill(npy: str, root: str, items: list[tuple], as_int16: bool) -> list[tuple[int, str]]:
    """Worker pass 2: read samples into rows of the memory-mapped signals.npy."""
    arr = np.load(npy, mmap_mode="r+")
    bad = []
    for row, eid, rel, hdr in items:
        label = record_label(eid, rel)
        try:
            d, hdr, invalid = read_digital(Path(root) / rel, label, hdr)
            cols = check_leads(hdr, label)
            if d.shape[0] != arr.shape[2]:
                raise DataError(f"{d.shape[0]} samples, the header says {arr.shape[2]}", label)
            check_values(d[:, cols], invalid[:, cols], LEADS, label)
            arr[row] = d[:, cols].T if as_int16 else to_mv(d, hdr, cols).T
        except DataError as exc:
            bad.append((row, exc.reason))
    arr.flush()
    return bad


def _chunks(items: list, n: int) -> list[list]:
    size = max(64, -(-len(items) // max(1, n)))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _mp_context():
    # fork starts a worker in milliseconds; spawn/forkserver re-import numpy, pandas and
    # pyarrow in every worker (seconds), which would eat the whole speed-up on a few
    # thousand records. The workers run only numpy and file I/O, so inheriting idle
    # threads (BLAS pools) is harmless; where fork is unavailable, forkserver it is.
    if "fork" in get_all_start_methods():
        return get_context("fork")
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["ecgsearch.data.ingest"])
    return ctx


def _run(fn, jobs: list[tuple], workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [r for job in jobs for r in fn(*job)]
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork() in any process with threads; see _mp_context.
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks",
                                category=DeprecationWarning)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=_mp_context()) as ex:
            return [r for res in ex.map(fn, *zip(*jobs)) for r in res]


def _storage(headers: list[Header]) -> tuple[bool, float]:
    """int16 + one gain when every record is fmt 16 with one gain and baseline 0."""
    gains = {g for h in headers for g in h.gains}
    ok = all(h.fast for h in headers) and len(gains) == 1 and all(
        b == 0 for h in headers for b in h.baselines)
    return (True, float(gains.pop())) if ok else (False, 1.0)


def _meta(db: pd.DataFrame, st: pd.DataFrame, fs: int, thresholds: dict) -> tuple[pd.DataFrame, int]:
    age, n_mapped = clean_ages(db["age"])
    meta = pd.DataFrame({"ecg_id": db.index.to_numpy(np.int64),
                         "patient_id": db["patient_id"].to_numpy(np.int64),
                         "strat_fold": db["strat_fold"].to_numpy(np.int64),
                         "age": age, "sex": db["sex"].astype("Int8").to_numpy(),
                         "filename": db[FILENAME_COLUMN[fs]].to_numpy(str)})
    for name, codes in LABEL_SETS.items():
        y = label_matrix(db, st, name, thresholds[name]).astype(np.uint8)
        for k, code in enumerate(codes):
            meta[f"{name}/{code}"] = y[:, k]
    return meta, n_mapped


def summarize(meta: pd.DataFrame, n_mapped: int) -> dict:
    """Counts for the manifest: folds, labels (total and per fold), ages."""
    label_cols = [f"{n}/{c}" for n, codes in LABEL_SETS.items() for c in codes]
    folds = meta["strat_fold"].value_counts().sort_index()
    per_fold = meta.groupby("strat_fold")[label_cols].sum()
    age = meta["age"].dropna()
    return {"folds": {str(k): int(v) for k, v in folds.items()},
            "labels": {c: int(meta[c].sum()) for c in label_cols},
            "labels_per_fold": {str(f): {c: int(v) for c, v in row.items()}
                                for f, row in per_fold.iterrows()},
            "age": {"count": int(age.size), "missing": int(meta["age"].isna().sum()),
                    "mean": float(age.mean()) if age.size else None,
                    "min": float(age.min()) if age.size else None,
                    "max": float(age.max()) if age.size else None,
                    "n_mapped_300": n_mapped}}


def _bad_records(bad: dict[int, str], paths: pd.Series, root: Path, hint: str) -> DataError:
    """One error listing every bad record (the first MAX_LISTED of them) and its fault."""
    lines = [f"  {record_label(e, paths.get(e))}: {bad[e]}" for e in sorted(bad)[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return DataError(f"{len(bad)} bad record(s) in {root} ({hint}):\n" + "\n".join(lines))


def _reusable(out: Path, fingerprint: str, settings: dict) -> dict | None:
    try:
        man = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    same = (man.get("version") == CACHE_VERSION and man.get("settings") == settings
            and man.get("source", {}).get("fingerprint") == fingerprint)
    sizes = man.get("sizes", {})
    intact = all((out / f).is_file() and (out / f).stat().st_size == sizes.get(f)
                 for f in FILES.values())
    return man if same and intact else None


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished cache into place; an old cache there is removed after."""
    old = None
    if out.exists():
        if any(out.iterdir()) and not (out / "manifest.json").exists():
            raise DataError(f"{out} exists and is not an ecgsearch cache; refusing to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def prepare_local(root: str | Path, out: str | Path, fs: int, workers: int = 1,
                  skip_bad: bool = False, rhythm_threshold: float = 0.0,
                  superclass_threshold: float = 0.0, target_fs: int | None = None,
                  n_samples: int | None = None) -> dict:
    """`cache.prepare` for a local output folder (cache.py handles URIs). With `target_fs` and
    `n_samples`, the cache is written at that model geometry (see data/geometry.py)."""
    from ecgsearch.data.geometry import derive, validate_geometry

    geometry = validate_geometry(target_fs, n_samples)
    if str(fs) not in ("100", "500"):
        raise ValueError(f"fs must be 100 or 500 (PTB-XL's two rates), got {fs!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    fs, root, out = int(fs), Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise DataError(f"PTB-XL root {root} is not a directory")
    thresholds = {"rhythm": float(rhythm_threshold), "superclass": float(superclass_threshold)}
    settings = {"fs": fs, "skip_bad": bool(skip_bad), "thresholds": thresholds}
    if geometry is not None:
        settings["geometry"] = {"target_fs": geometry[0], "n_samples": geometry[1]}
    bad: dict[int, str] = {}
    db = read_database(root, bad=bad)
    st = read_statements(root)
    bad.update(unknown_codes(db, st))
    col = FILENAME_COLUMN[fs]
    for eid, rel in db[col].items():
        if not isinstance(rel, str) or not rel.strip():
            bad.setdefault(int(eid), f"{col} is empty")
    rels = db[col].fillna("").astype(str).str.strip().tolist()
    fingerprint = _fingerprint(root, rels)
    reused = _reusable(out, fingerprint, settings)
    if reused is not None:
        return {**reused, "reused": True}
    ids = db.index.to_numpy(np.int64)
    todo = [(i, int(e), r) for i, (e, r) in enumerate(zip(ids, rels)) if int(e) not in bad]
    n_jobs = 4 * workers
    heads = _run(_headers, [(str(root), c, fs) for c in _chunks(todo, n_jobs)], workers)
    hdrs: dict[int, Header] = {}
    for row, hdr, reason in heads:
        if reason:
            bad[int(ids[row])] = reason
        else:
            hdrs[row] = hdr
    lengths = Counter(h.sig_len for h in hdrs.values())
    native_len = lengths.most_common(1)[0][0] if lengths else 0
    for row, h in list(hdrs.items()):
        if h.sig_len != native_len:
            bad[int(ids[row])] = (f"{h.sig_len} samples per lead, the other records have "
                                  f"{native_len}")
            del hdrs[row]
    paths = db[col].fillna("")
    if not hdrs:
        raise _bad_records(bad, paths, root, "no record is readable")
    as_int16, gain = _storage(list(hdrs.values()))
    rows = sorted(hdrs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        npy = tmp / FILES["signals"]
        arr = np.lib.format.open_memmap(npy, mode="w+", shape=(len(rows), len(LEADS), native_len),
                                        dtype=np.int16 if as_int16 else np.float32)
        del arr
        items = [(k, int(ids[r]), rels[r], hdrs[r]) for k, r in enumerate(rows)]
        failed = _run(_fill, [(str(npy), str(root), c, as_int16) for c in _chunks(items, n_jobs)],
                      workers)
        for k, reason in failed:
            bad[int(ids[rows[k]])] = reason
        if failed:  # compact: one copy, only when samples turned out bad
            keep = sorted(set(range(len(rows))) - {k for k, _ in failed})
            src = np.load(npy, mmap_mode="r")
            np.save(tmp / "compact.npy", src[keep])
            del src
            os.replace(tmp / "compact.npy", npy)
            rows = [rows[k] for k in keep]
        if bad and not skip_bad:
            raise _bad_records(bad, paths, root, "use --skip-bad to convert the rest and "
                               "list them in skipped.csv")
        skipped = [{"ecg_id": e, "path": paths.get(e, ""), "reason": bad[e]} for e in sorted(bad)]
        resampled = derive(npy, fs, geometry, gain, ids[rows]) if geometry is not None else None
        meta, n_mapped = _meta(db.iloc[rows], st, fs, thresholds)
        meta.to_parquet(tmp / FILES["meta"], index=False)
        pd.DataFrame(skipped, columns=["ecg_id", "path", "reason"]).to_csv(
            tmp / FILES["skipped"], index=False)
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "created_by": f"ecgsearch {__version__}",
            "source": {"root": str(root), "fingerprint": fingerprint,
                       "database_sha256": sha256_file(root / DB_FILE),
                       "statements_sha256": sha256_file(root / STATEMENTS_FILE)},
            "settings": settings, "fs": geometry[0] if geometry else fs, "leads": list(LEADS),
            "n_records": len(rows), "n_samples": geometry[1] if geometry else native_len,
            **({"geometry": resampled} if resampled else {}), "dtype": "int16" if as_int16 else "float32", "gain": gain,
            "files": FILES, **summarize(meta, n_mapped), "skipped": skipped,
            "checksums": {f: sha256_file(tmp / f) for f in FILES.values()},
            "sizes": {f: (tmp / f).stat().st_size for f in FILES.values()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "reused": False}

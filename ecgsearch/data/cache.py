"""The prepared cache: `prepare`, `load_cache`, `cache_info` and `ECGCache`.

A cache path is a local folder or a `pyarrow.fs` URI (file://, s3://, gs://, ...).
Remote caches are downloaded once per node into ECGSEARCH_CACHE_DIR (default
~/.cache/ecgsearch/remote), checked against the manifest's sha256 sums, then memory-mapped
like local ones, so every process on a node shares one copy through the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from ecgsearch.data.errors import DataError
from ecgsearch.data.ingest import CACHE_FORMAT, CACHE_VERSION, FILES, prepare_local, sha256_file
from ecgsearch.data.ptbxl import SplitConfig
from ecgsearch.leads import LABEL_SETS, LEADS, lead_indices, parse_leads


def _resolve(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(None, local path) for local caches, (filesystem, path) for remote ones."""
    s = str(path)
    if "://" not in s:
        return None, s
    try:
        fs, p = pafs.FileSystem.from_uri(s)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot open cache URI {s}: {exc}") from exc
    return (None, p) if isinstance(fs, pafs.LocalFileSystem) else (fs, p)


def _read_remote_manifest(fs: pafs.FileSystem, path: str) -> dict:
    try:
        with fs.open_input_stream(f"{path}/manifest.json") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError) as exc:
        raise DataError(f"no readable manifest.json in cache {path}: {exc}") from exc


def fetch_remote(fs: pafs.FileSystem, path: str, local_root: str | Path | None = None) -> Path:
    """Local copy of a remote cache, downloaded once and verified by sha256."""
    manifest = _read_remote_manifest(fs, path)
    base = Path(local_root or os.environ.get("ECGSEARCH_CACHE_DIR")
                or Path.home() / ".cache" / "ecgsearch" / "remote")
    key = hashlib.sha256(f"{fs.type_name}:{path}".encode()).hexdigest()[:20]
    dest = base / key
    try:
        if json.loads((dest / "manifest.json").read_text())["checksums"] == manifest["checksums"]:
            return dest
    except (OSError, ValueError, KeyError):
        pass
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        for name, digest in manifest["checksums"].items():
            if sha256_file(tmp / name) != digest:
                raise DataError(f"download of {path}/{name} does not match its manifest checksum")
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare(root: str | Path, out: str | Path, fs: int | str, workers: int = 1,
            skip_bad: bool = False, *, rhythm_threshold: float = 0.0,
            superclass_threshold: float = 0.0, target_fs: int | None = None,
            n_samples: int | None = None) -> dict:
    """Convert the PTB-XL at `root` into a cache at `out` (folder or URI); the manifest.

    Re-running on an unchanged source with the same settings does nothing (the returned
    manifest then has reused=True); a changed source is detected and rebuilt. Without
    `skip_bad`, any bad record raises one `DataError` listing every bad record.
    """
    kw = {"workers": workers, "skip_bad": skip_bad, "rhythm_threshold": rhythm_threshold,
          "superclass_threshold": superclass_threshold, "target_fs": target_fs, "n_samples": n_samples}
    remote, path = _resolve(out)
    if remote is None:
        return prepare_local(root, path, fs, **kw)
    # Remote: build in a local staging folder (reused across runs), then upload.
    stage = Path(os.environ.get("ECGSEARCH_CACHE_DIR") or Path.home() / ".cache" / "ecgsearch") \
        / "staging" / hashlib.sha256(str(out).encode()).hexdigest()[:20]
    manifest = prepare_local(root, stage, fs, **kw)
    try:
        same = _read_remote_manifest(remote, path).get("checksums") == manifest["checksums"]
    except DataError:
        same = False
    if not same:
        remote.create_dir(path, recursive=True)
        # The manifest goes last: a reader that finds it finds complete files.
        for name in [*FILES.values(), "manifest.json"]:
            pafs.copy_files(str(stage / name), f"{path}/{name}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=remote)
    return {**manifest, "reused": manifest["reused"] and same}


def _local_dir(path: str | Path) -> Path:
    remote, p = _resolve(path)
    return Path(p) if remote is None else fetch_remote(remote, p)


def _read_manifest(d: Path) -> dict:
    try:
        man = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{d} is not a prepared cache (no manifest.json); run "
                        "`ecgsearch data prepare` first") from None
    except ValueError as exc:
        raise DataError(f"{d}/manifest.json is not valid JSON: {exc}") from exc
    if man.get("format") != CACHE_FORMAT or man.get("version") != CACHE_VERSION:
        raise DataError(f"{d}: cache format {man.get('format')} v{man.get('version')} is not "
                        f"{CACHE_FORMAT} v{CACHE_VERSION}; prepare it again")
    return man


@dataclass
class ECGCache:
    """A prepared cache in memory (or memory-mapped). See docs/ARCHITECTURE.md."""

    signals: np.ndarray
    gain: float
    meta: pd.DataFrame
    fs: int
    leads: tuple[str, ...]
    manifest: dict
    path: Path | None = None                 # local folder (a download for remote caches)
    mmap: bool = field(default=True, repr=False)
    uri: str | None = field(default=None, repr=False)  # as given to load_cache

    def __post_init__(self):
        if self.signals.shape[0] != len(self.meta) or self.signals.shape[1] != len(self.leads):
            raise DataError(f"cache {self.path}: signals {self.signals.shape} do not match "
                            f"{len(self.meta)} metadata rows and {len(self.leads)} leads")

    def __len__(self) -> int:
        return len(self.meta)

    def __reduce__(self):
        # Pickling (Ray, multiprocessing) sends the path, never the array: the receiver
        # memory-maps the same files.
        if self.path is None:
            raise TypeError("an ECGCache built in memory cannot be pickled; pass its path")
        return (load_cache, (self.uri or str(self.path), self.mmap))

    @property
    def n_samples(self) -> int:
        return int(self.signals.shape[2])

    def _idx(self, idx) -> np.ndarray:
        if idx is None:
            return np.arange(len(self))
        idx = np.atleast_1d(np.asarray(idx))
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"record index out of range for a cache of {len(self)} records")
        return idx.astype(np.int64, copy=False)

    def split_indices(self, split: str, splits: SplitConfig | dict | None = None) -> np.ndarray:
        """Row positions of the records whose strat_fold belongs to `split`, ascending."""
        cfg = splits if isinstance(splits, SplitConfig) else SplitConfig.from_dict(splits)
        folds = cfg.folds(split)
        return np.flatnonzero(self.meta["strat_fold"].isin(folds).to_numpy())

    def labels(self, label_set: str, idx=None) -> np.ndarray:
        if label_set not in LABEL_SETS:
            raise ValueError(f"unknown label set {label_set!r}; known: {', '.join(LABEL_SETS)}")
        cols = [f"{label_set}/{c}" for c in LABEL_SETS[label_set]]
        return self.meta[cols].to_numpy(np.float32)[self._idx(idx)]

    def ages(self, idx=None) -> np.ndarray:
        return self.meta["age"].to_numpy(np.float32)[self._idx(idx)]

    def signals_raw(self, idx=None, leads=None) -> np.ndarray:
        """Stored samples (int16 adu or float32 mV) as a copy (len(idx), n_leads, T), in the order asked."""
        rows = self._idx(idx)
        lead_idx = lead_indices(parse_leads(leads), self.leads) if leads is not None else None
        # Fancy indexing copies once. Rows are read in file order (memory-mapped pages stream)
        # and put back in the order asked.
        order = None if np.all(rows[1:] >= rows[:-1]) else np.argsort(rows, kind="stable")
        take = rows if order is None else rows[order]
        raw = self.signals[take] if lead_idx is None else self.signals[np.ix_(take, lead_idx)]
        if order is not None:
            back = np.empty_like(raw)
            back[order] = raw
            raw = back
        return raw

    def signals_mv(self, idx=None, leads=None) -> np.ndarray:
        """float32 mV copy (len(idx), n_leads, T); int16 storage is divided by `gain`."""
        raw = self.signals_raw(idx, leads)
        return raw if raw.dtype == np.float32 else adu_to_mv(raw, self.gain)


def adu_to_mv(adu: np.ndarray, gain: float) -> np.ndarray:
    """int16 adu -> float32 mV: one float32 division per sample (what the loader does on a device)."""
    return np.divide(adu, np.float32(gain), dtype=np.float32)


def load_cache(path: str | Path, mmap: bool = True) -> ECGCache:
    """Open a prepared cache (folder or URI). mmap=False reads the signals into memory
    once (a single copy); mmap=True maps them read-only."""
    d = _local_dir(path)
    man = _read_manifest(d)
    for name in FILES.values():
        f = d / name
        if not f.is_file() or f.stat().st_size != man["sizes"][name]:
            raise DataError(f"cache file {f} is missing or has the wrong size; prepare again")
    sig = np.load(d / FILES["signals"], mmap_mode="r" if mmap else None)
    want = (man["n_records"], len(LEADS), man["n_samples"])
    if sig.shape != want or sig.dtype != np.dtype(man["dtype"]):
        raise DataError(f"{d}/signals.npy is {sig.dtype}{sig.shape}, the manifest says "
                        f"{man['dtype']}{want}")
    meta = pd.read_parquet(d / FILES["meta"])
    return ECGCache(signals=sig, gain=float(man["gain"]), meta=meta, fs=int(man["fs"]),
                    leads=tuple(man["leads"]), manifest=man, path=d, mmap=mmap, uri=str(path))


def cache_info(path: str | Path) -> dict:
    """Summary from the manifest (remote caches are not downloaded for this)."""
    remote, p = _resolve(path)
    man = _read_remote_manifest(remote, p) if remote else _read_manifest(Path(p))
    return {"path": str(path), "n_records": man["n_records"], "fs": man["fs"],
            "n_samples": man["n_samples"], "leads": man["leads"], "dtype": man["dtype"],
            "geometry": man.get("geometry"),
            "gain": man["gain"], "folds": man["folds"], "labels": man["labels"],
            "labels_per_fold": man["labels_per_fold"], "age": man["age"],
            "skipped": len(man["skipped"]), "skipped_records": man["skipped"],
            "source": man["source"]["root"]}

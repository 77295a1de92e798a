"""Shared fixtures: the real PTB-XL sample and session-wide synthetic data sets.

Synthetic roots and caches are built once per test session (per argument set) in a
session temp folder, so every test module can use them for the cost of one build.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ecgsearch.data.cache import prepare
from ecgsearch.data.synth import synthesize

SAMPLE_ENV = "ECGSEARCH_PTBXL_SAMPLE"
# The session workhorse: enriched (15 % per rhythm code) so every split of ~60 records
# holds positives of all six codes and AUROCs are defined; seed 0, 100 Hz.
# Fixtures use the textbook generator ("clean"): tests check mechanisms (learning, search,
# planted leads) with exact labels; the realistic default has its own tests (test_synth_realism).
SYNTH_DEFAULTS = {"records": 600, "seed": 0, "informative_leads": None, "fs": "100",
                  "enrich": True, "realism": "clean"}


@pytest.fixture(scope="session", autouse=True)
def _working_directory(tmp_path_factory):
    """Every command's default MLflow store is ./mlflow.db: run the session from a scratch folder
    so no test writes one into the checkout (tests that check the default chdir on their own)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def ptbxl_sample() -> Path:
    """Root of the real 500-record PTB-XL sample; skips when it is not configured."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        pytest.skip(f"real PTB-XL sample not configured: set {SAMPLE_ENV} to its folder "
                    "(e.g. /work/shared/ptbxl-sample)")
    root = Path(value)
    if not (root / "ptbxl_database.csv").is_file():
        pytest.skip(f"{SAMPLE_ENV}={value} holds no ptbxl_database.csv")
    return root


class _SynthStore:
    """Builds each (settings) synthetic root and cache once per session."""

    def __init__(self, base: Path):
        self.base = base
        self.roots: dict[tuple, Path] = {}
        self.caches: dict[tuple, Path] = {}

    @staticmethod
    def key(kw: dict) -> tuple:
        kw = {**SYNTH_DEFAULTS, **kw}
        inf = kw["informative_leads"]
        if isinstance(inf, str):
            inf = tuple(inf.split(","))
        kw["informative_leads"] = tuple(inf) if inf else None
        kw["fs"] = str(kw["fs"])
        return tuple(sorted(kw.items()))

    def root(self, kw: dict) -> Path:
        key = self.key(kw)
        if key not in self.roots:
            args = dict(key)
            out = self.base / f"root{len(self.roots)}"
            synthesize(out, args.pop("records"), seed=args.pop("seed"), fs=args.pop("fs"),
                       informative_leads=args.pop("informative_leads"), **args)
            self.roots[key] = out
        return self.roots[key]

    def cache(self, kw: dict) -> Path:
        key = self.key(kw)
        fs = dict(key)["fs"]
        if fs not in ("100", "500"):
            raise ValueError(f"make_synth_cache: fs must be '100' or '500' (a cache holds one "
                             f"rate), got {fs!r}")
        if key not in self.caches:
            out = self.base / f"cache{len(self.caches)}"
            prepare(self.root(kw), out, int(fs))
            self.caches[key] = out
        return self.caches[key]


@pytest.fixture(scope="session")
def _synth_store(tmp_path_factory) -> _SynthStore:
    return _SynthStore(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def synth_root(_synth_store) -> Path:
    """Synthetic PTB-XL root: 600 records, 100 Hz, seed 0, six codes enriched to 15 %."""
    return _synth_store.root({})


@pytest.fixture(scope="session")
def synth_cache(_synth_store) -> Path:
    """`synth_root` prepared at 100 Hz (int16 cache); the cache folder."""
    return _synth_store.cache({})


@pytest.fixture(scope="session")
def make_synth_cache(_synth_store):
    """Factory (records=600, seed=0, informative_leads=None, fs="100", **synthesize_kw)
    -> cache Path, built once per argument set. enrich defaults to True, as above."""
    def make(records: int = 600, seed: int = 0, informative_leads=None, fs="100", **kw) -> Path:
        return _synth_store.cache({"records": records, "seed": seed,
                                   "informative_leads": informative_leads, "fs": fs, **kw})
    return make


def write_wfdb_root(root: Path, n: int = 4, fs: int = 100, seconds: int = 10,
                    gain: float = 1000.0, seed: int = 0) -> Path:
    """A small PTB-XL-layout root written with `wfdb.wrsamp` (for damage tests).

    Records 1..n, all NORM, folds 1..n, ages 50+i; signals are smooth random mV traces
    quantised to the gain, so reading them back must give the same numbers.
    """
    import numpy as np
    import pandas as pd
    import wfdb

    from ecgsearch.data.synth_tables import DB_COLUMN_ORDER, statements_frame
    from ecgsearch.leads import LEADS

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        rel = f"records{fs}/00000/{i:05d}_{'lr' if fs == 100 else 'hr'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(fs * seconds) / fs
        x = np.stack([0.5 * np.sin(2 * np.pi * rng.uniform(0.8, 2.0) * t + rng.uniform(0, 6))
                      + 0.05 * rng.standard_normal(t.size) for _ in LEADS], axis=1)
        x = np.round(x * gain) / gain
        wfdb.wrsamp(Path(rel).name, fs=fs, units=["mV"] * 12, sig_name=list(LEADS), p_signal=x,
                    fmt=["16"] * 12, adc_gain=[gain] * 12, baseline=[0] * 12,
                    write_dir=str((root / rel).parent))
        rows.append({"ecg_id": i, "patient_id": 100.0 + i, "age": 50.0 + i, "sex": i % 2,
                     "scp_codes": str({"NORM": 100.0, "SR": 0.0}), "strat_fold": (i - 1) % 10 + 1,
                     "filename_lr": f"records100/00000/{i:05d}_lr",
                     "filename_hr": f"records500/00000/{i:05d}_hr"})
    pd.DataFrame(rows).reindex(columns=list(DB_COLUMN_ORDER)).to_csv(
        root / "ptbxl_database.csv", index=False)
    statements_frame().to_csv(root / "scp_statements.csv")
    return root


@pytest.fixture(scope="session")
def make_wfdb_root():
    """`write_wfdb_root(root, n=4, fs=100, seconds=10, gain=1000.0, seed=0) -> root`."""
    return write_wfdb_root

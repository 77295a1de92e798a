"""PTB-XL tables, labels, ages, splits and single-record reading.

Layout (as distributed on PhysioNet): `ptbxl_database.csv` (one row per ECG, index
`ecg_id`), `scp_statements.csv` (one row per SCP code), `records100/` (`filename_lr`)
and `records500/` (`filename_hr`) holding WFDB records.
"""
from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ecgsearch.data.errors import DataError, record_label
from ecgsearch.data.wfdbio import check_leads, check_values, read_digital, to_mv
from ecgsearch.leads import LABEL_SETS, LEADS

DB_FILE = "ptbxl_database.csv"
STATEMENTS_FILE = "scp_statements.csv"
DB_COLUMNS = ("ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold",
              "filename_lr", "filename_hr")
STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class")
FILENAME_COLUMN = {100: "filename_lr", 500: "filename_hr"}
AGE_OVER_89 = 300      # PTB-XL codes ages above 89 as 300 (HIPAA) ...
AGE_OVER_89_AS = 90.0  # ... which we read as 90, the smallest age it can stand for.
MAX_AGE = 120


def _read_csv(path: Path, what: str, **kw) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{what} {path} cannot be parsed as CSV: {exc}") from exc


def _parse_codes(text) -> dict[str, float]:
    # literal_eval, never eval: the CSV is data, and a code string must not run.
    value = ast.literal_eval(text) if isinstance(text, str) else None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in value.items()):
        raise ValueError("not a dict of code -> likelihood")
    return {k: float(v) for k, v in value.items()}


def read_database(root: str | Path, *, bad: dict[int, str] | None = None) -> pd.DataFrame:
    """`ptbxl_database.csv` with index `ecg_id` and `scp_codes` parsed to dicts.

    Row faults (unparsable `scp_codes`, duplicated `ecg_id`, missing/invalid fold, patient,
    sex or age) raise `DataError` naming the ecg_id - or, when a dict `bad` is given, are
    recorded there as {ecg_id: reason} and the rows dropped. Missing columns always raise.
    """
    path = Path(root) / DB_FILE
    df = _read_csv(path, "database", dtype={"scp_codes": str})
    missing = [c for c in DB_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks required column(s) {', '.join(missing)}")
    ids = pd.to_numeric(df["ecg_id"], errors="coerce")
    if ids.isna().any() or (ids != ids.round()).any():
        row = int(np.flatnonzero(ids.isna() | (ids != ids.round()))[0])
        raise DataError(f"{path}: ecg_id {df['ecg_id'].iloc[row]!r} in data row {row + 1} "
                        "is not an integer")
    df["ecg_id"] = ids.astype(np.int64)
    faults: dict[int, str] = {}
    counts = df["ecg_id"].value_counts()
    for eid, n in counts[counts > 1].items():
        faults[int(eid)] = f"ecg_id duplicated ({n} rows in {DB_FILE})"
    codes = []
    for eid, text in zip(df["ecg_id"], df["scp_codes"]):
        try:
            codes.append(_parse_codes(text))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            codes.append(None)
            faults.setdefault(int(eid), f"unparsable scp_codes {text!r}")
    df["scp_codes"] = codes
    for col, ok in (("strat_fold", lambda v: v.notna() & (v == v.round()) & (v >= 1)),
                    ("patient_id", lambda v: v.notna()),
                    ("sex", lambda v: v.isna() | v.isin([0, 1])),
                    ("age", lambda v: v.isna() | (v == AGE_OVER_89) | v.between(0, MAX_AGE))):
        vals = pd.to_numeric(df[col], errors="coerce")
        wrong = ~ok(vals) | (vals.isna() & df[col].notna())
        for eid, raw in zip(df["ecg_id"][wrong], df[col][wrong]):
            faults.setdefault(int(eid), f"invalid {col} {raw!r}")
        df[col] = vals
    if faults:
        if bad is None:
            eid, reason = next(iter(sorted(faults.items())))
            more = f" (and {len(faults) - 1} more bad rows)" if len(faults) > 1 else ""
            raise DataError(f"{reason}{more}", f"{DB_FILE}: ecg_id {eid}")
        bad.update(faults)
        df = df[~df["ecg_id"].isin(list(faults))]
    df = df.astype({"strat_fold": np.int64, "patient_id": np.int64})
    return df.set_index("ecg_id").sort_index()


def read_statements(root: str | Path) -> pd.DataFrame:
    """`scp_statements.csv` indexed by SCP code, with the diagnostic columns checked."""
    path = Path(root) / STATEMENTS_FILE
    st = _read_csv(path, "statements table", index_col=0)
    missing = [c for c in STATEMENT_COLUMNS if c not in st.columns]
    if missing:
        raise DataError(f"{path} lacks required column(s) {', '.join(missing)}")
    if st.index.duplicated().any():
        raise DataError(f"{path}: SCP code(s) {sorted(set(st.index[st.index.duplicated()]))} "
                        "listed more than once")
    return st


def unknown_codes(db: pd.DataFrame, statements: pd.DataFrame) -> dict[int, str]:
    """{ecg_id: reason} for records using SCP codes absent from the statements table."""
    known = set(statements.index)
    out = {}
    for eid, codes in db["scp_codes"].items():
        extra = sorted(set(codes) - known)
        if extra:
            out[int(eid)] = f"scp_codes {', '.join(extra)} not in {STATEMENTS_FILE}"
    return out


def label_matrix(db: pd.DataFrame, statements: pd.DataFrame, label_set: str,
                 threshold: float = 0.0) -> np.ndarray:
    """0/1 float32 matrix (n_records, k) in the order of `LABEL_SETS[label_set]`.

    A statement counts when its likelihood is >= `threshold` (0, the default, counts every
    statement present, as the PTB-XL benchmark seed does). rhythm: the code itself;
    superclass: `diagnostic_class` of the diagnostic statements.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; known: {', '.join(LABEL_SETS)}")
    names = LABEL_SETS[label_set]
    col = {n: i for i, n in enumerate(names)}
    y = np.zeros((len(db), len(names)), dtype=np.float32)
    if label_set == "superclass":
        diag = statements["diagnostic"].fillna(0).astype(float) == 1
        cls = statements["diagnostic_class"].where(diag)
    for row, (eid, codes) in enumerate(db["scp_codes"].items()):
        for code, lik in codes.items():
            if lik < threshold:
                continue
            if label_set == "rhythm":
                target = code
            elif code not in cls.index:
                raise DataError(f"scp code {code!r} is not in {STATEMENTS_FILE}", f"ecg_id {eid}")
            else:
                target = cls[code]
            if target in col:
                y[row, col[target]] = 1.0
    return y


def clean_ages(series: pd.Series) -> tuple[np.ndarray, int]:
    """Ages as float64 with NaN for missing; 300 (over 89) -> 90. Returns (ages, n_mapped).

    Missing ages stay NaN so that only the age task drops those records.
    """
    age = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    over = age == AGE_OVER_89
    bad = ~np.isnan(age) & ~over & ((age < 0) | (age > MAX_AGE))
    if bad.any():
        ids = list(series.index[bad][:5])
        raise DataError(f"invalid age(s) {list(age[bad][:5])} for ecg_id {ids}")
    age[over] = AGE_OVER_89_AS
    return age, int(over.sum())


@dataclass(frozen=True)
class SplitConfig:
    """Which `strat_fold`s make each split (PTB-XL's recommendation by default)."""

    train: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    val: tuple[int, ...] = (9,)
    test: tuple[int, ...] = (10,)

    def __post_init__(self):
        seen: dict[int, str] = {}
        for split in ("train", "val", "test"):
            folds = getattr(self, split)
            if isinstance(folds, (int, np.integer)) or not all(
                    isinstance(f, (int, np.integer)) and not isinstance(f, bool) for f in folds):
                raise ValueError(f"splits.{split} must be a list of fold numbers, got {folds!r}")
            if not folds:
                raise ValueError(f"splits.{split} is empty; give at least one strat_fold")
            for f in folds:
                if f in seen:
                    raise ValueError(f"strat_fold {f} is in both splits.{seen[f]} and splits.{split}")
                seen[f] = split
            object.__setattr__(self, split, tuple(int(f) for f in folds))

    def folds(self, split: str) -> tuple[int, ...]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        return getattr(self, split)

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> SplitConfig:
        if d is None:
            return cls()
        extra = sorted(set(d) - {"train", "val", "test"})
        if extra:
            raise ValueError(f"unknown split name(s) {', '.join(extra)}; use train, val, test")
        return cls(**{k: tuple(v) for k, v in d.items()})


def read_record(path: str | Path, fs: int | None = None,
                leads=LEADS, ecg_id: int | None = None) -> tuple[np.ndarray, int]:
    """One record as (x float64 (len(leads), T) in mV, fs), values exactly as wfdb gives.

    Leads are picked by name (case-insensitive) into the order of `leads`. A sampling rate
    other than `fs`, unknown/missing leads, NaN or flat leads raise `DataError`.
    """
    label = record_label(ecg_id, str(path))
    d, hdr, invalid = read_digital(path, label)
    if fs is not None and hdr.fs != fs:
        raise DataError(f"sampling rate {hdr.fs:g} Hz, expected {fs} Hz", label)
    cols = check_leads(hdr, label, leads)
    check_values(d[:, cols], invalid[:, cols], [hdr.names[c] for c in cols], label)
    return to_mv(d, hdr, cols).T.copy(), int(hdr.fs)

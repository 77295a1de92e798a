"""WFDB record I/O: a fast numpy path for format 16, wfdb for everything else.

PTB-XL stores every record as one fmt-16 `.dat` (little-endian int16, samples interleaved)
plus a text `.hea`. Reading that with `np.fromfile` is ~20x faster than `wfdb.rdsamp`, so
the cache reads it directly and *validates it against the header* (signal count, length,
checksums, first samples) so that the fast path can never be less strict than wfdb.
Any other format, multi-file or multi-segment record goes through `wfdb.rdrecord`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgsearch.data.errors import DataError
from ecgsearch.leads import LEADS

FMT16_INVALID = -32768  # WFDB's "no sample" value for fmt 16; wfdb turns it into NaN.
DEFAULT_GAIN = 200.0    # WFDB default adu per physical unit when the header gives none/0.


@dataclass(frozen=True)
class Header:
    """The parts of a `.hea` the cache needs. `fast` = readable with np.fromfile."""

    record: str
    n_sig: int
    fs: float
    sig_len: int | None
    files: tuple[str, ...]
    fmts: tuple[str, ...]
    gains: tuple[float, ...]
    baselines: tuple[int, ...]
    units: tuple[str, ...]
    init_values: tuple[int | None, ...]
    checksums: tuple[int | None, ...]
    names: tuple[str, ...]
    fast: bool


def split_record_path(path: str | Path) -> Path:
    """Record path without `.hea`/`.dat`, as wfdb wants it."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".hea", ".dat") else p


def _gain_field(tok: str, adc_zero: int) -> tuple[float, int, str]:
    # "1000.0(0)/mV" -> gain, baseline, units; baseline defaults to adc zero.
    units = "mV"
    if "/" in tok:
        tok, units = tok.split("/", 1)
    baseline = adc_zero
    if "(" in tok:
        tok, base = tok.split("(", 1)
        baseline = int(base.rstrip(")"))
    gain = float(tok)
    return (gain if gain != 0 else DEFAULT_GAIN), baseline, units


def parse_header(hea: str | Path, label: str) -> Header:
    """Parse a WFDB header file; faults raise `DataError` naming `label`."""
    hea = Path(hea)
    try:
        text = hea.read_text(encoding="latin-1")
    except FileNotFoundError:
        raise DataError(f"header file {hea.name} is missing", label) from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"header file {hea.name} is empty", label)
    rec = lines[0].split()
    try:
        multi_segment = "/" in rec[0]
        n_sig = int(rec[1])
        fs = float(rec[2].split("/")[0]) if len(rec) > 2 else 250.0
        sig_len = int(rec[3]) if len(rec) > 3 else None
    except (IndexError, ValueError):
        raise DataError(f"unreadable record line {lines[0]!r} in {hea.name}", label) from None
    # Multi-segment records keep no signal lines here; they go through wfdb (fast=False).
    sig_lines = [] if multi_segment else lines[1:1 + n_sig]
    if not multi_segment and len(sig_lines) != n_sig:
        raise DataError(f"header {hea.name} announces {n_sig} signals but describes "
                        f"{len(sig_lines)}", label)
    files, fmts, gains, bases, units, inits, sums, names = ([] for _ in range(8))
    for ln in sig_lines:
        tok = ln.split(maxsplit=8)
        try:
            files.append(tok[0])
            fmts.append(tok[1])
            adc_zero = int(tok[4]) if len(tok) > 4 else 0
            g, b, u = _gain_field(tok[2], adc_zero) if len(tok) > 2 else (DEFAULT_GAIN, 0, "mV")
            gains.append(g)
            bases.append(b)
            units.append(u)
            inits.append(int(tok[5]) if len(tok) > 5 else None)
            sums.append(int(tok[6]) if len(tok) > 6 else None)
            names.append(tok[8] if len(tok) > 8 else "")
        except ValueError:
            raise DataError(f"unreadable signal line {ln!r} in {hea.name}", label) from None
    fast = (not multi_segment and sig_len is not None and n_sig > 0
            and len(set(files)) == 1 and all(f == "16" for f in fmts)
            and all(c is not None for c in sums) and all(v is not None for v in inits))
    return Header(rec[0], n_sig, fs, sig_len, tuple(files), tuple(fmts), tuple(gains),
                  tuple(bases), tuple(units), tuple(inits), tuple(sums), tuple(names), fast)


def check_dat_size(base: Path, hdr: Header, label: str) -> Path:
    """The fmt-16 .dat must exist and hold exactly n_sig x sig_len samples."""
    dat = base.parent / hdr.files[0]
    try:
        size = os.stat(dat).st_size
    except FileNotFoundError:
        raise DataError(f"data file {dat.name} is missing", label) from None
    want = 2 * hdr.n_sig * hdr.sig_len
    if size < want:
        raise DataError(f"data file {dat.name} is truncated: {size} bytes, the header "
                        f"({hdr.n_sig} signals x {hdr.sig_len} samples, fmt 16) needs {want}",
                        label)
    if size > want:
        raise DataError(f"header and data disagree: {dat.name} has {size} bytes, the header "
                        f"({hdr.n_sig} signals x {hdr.sig_len} samples) implies {want}", label)
    return dat


def _read_fast(base: Path, hdr: Header, label: str) -> np.ndarray:
    dat = check_dat_size(base, hdr, label)
    d = np.fromfile(dat, dtype="<i2").reshape(hdr.sig_len, hdr.n_sig)
    # Header checksums are the 16-bit sum of each signal; a mismatch means the .dat is
    # not the one this header was written for (or was edited).
    sums = d.sum(axis=0, dtype=np.int64) % 65536
    for i, (got, want_sum) in enumerate(zip(sums, hdr.checksums)):
        if got != want_sum % 65536:
            raise DataError(f"header and data disagree: checksum of signal {i} "
                            f"({hdr.names[i]}) is {got}, the header says {want_sum}", label)
    bad = [i for i, v in enumerate(hdr.init_values) if d[0, i] != v]
    if bad:
        i = bad[0]
        raise DataError(f"header and data disagree: first sample of signal {i} "
                        f"({hdr.names[i]}) is {d[0, i]}, the header says {hdr.init_values[i]}",
                        label)
    return d


def _read_wfdb(base: Path, label: str) -> tuple[np.ndarray, Header, np.ndarray]:
    """Fallback for other formats: (digital (T, n_sig), header, invalid-sample mask)."""
    import wfdb  # imported here: costs ~1 s, and the fast path never needs it
    from wfdb.io._signal import INVALID_SAMPLE_VALUE
    try:
        rec = wfdb.rdrecord(str(base), physical=False, smooth_frames=True)
    except Exception as exc:  # wfdb raises many types; keep its words, add the record
        raise DataError(f"wfdb cannot read the record: {type(exc).__name__}: {exc}", label) from exc
    d = np.asarray(rec.d_signal)
    invalid = np.zeros(d.shape, dtype=bool)
    for i, f in enumerate(rec.fmt):
        if INVALID_SAMPLE_VALUE.get(f) is not None:
            invalid[:, i] = d[:, i] == INVALID_SAMPLE_VALUE[f]
    hdr = Header(rec.record_name, rec.n_sig, float(rec.fs), rec.sig_len, tuple(rec.file_name),
                 tuple(rec.fmt), tuple(float(g) if g else DEFAULT_GAIN for g in rec.adc_gain),
                 tuple(int(b) for b in rec.baseline), tuple(rec.units),
                 tuple(rec.init_value or [None] * rec.n_sig),
                 tuple(rec.checksum or [None] * rec.n_sig), tuple(rec.sig_name), False)
    return d, hdr, invalid


def read_digital(path: str | Path, label: str | None = None,
                 hdr: Header | None = None) -> tuple[np.ndarray, Header, np.ndarray]:
    """Read a record's digital samples: (d (T, n_sig) integer, header, invalid mask).

    The mask marks WFDB "no sample" values (NaN after conversion). Missing files,
    truncation and header/data disagreements raise `DataError` naming `label`.
    `hdr` skips re-parsing a header the caller already holds.
    """
    base = split_record_path(path)
    label = label or str(base)
    if hdr is None:
        hdr = parse_header(base.with_name(base.name + ".hea"), label)
    if hdr.fast:
        d = _read_fast(base, hdr, label)
        return d, hdr, d == FMT16_INVALID
    for f in set(hdr.files):
        if not (base.parent / f).exists():
            raise DataError(f"data file {f} is missing", label)
    return _read_wfdb(base, label)


def check_leads(hdr: Header, label: str, leads=LEADS) -> list[int]:
    """Column of each wanted lead in the record; unknown or missing leads are errors.

    Used by the cache, where a 12-lead PTB-XL record must hold exactly the 12 leads.
    """
    canon = [n.strip().upper() for n in hdr.names]
    unknown = [n for n, c in zip(hdr.names, canon) if c not in LEADS]
    if unknown:
        raise DataError(f"unknown lead name(s) {', '.join(map(repr, unknown))} in the header", label)
    dup = sorted({c for c in canon if canon.count(c) > 1})
    if dup:
        raise DataError(f"lead(s) {', '.join(dup)} appear more than once in the header", label)
    missing = [w for w in leads if w not in canon]
    if missing:
        raise DataError(f"lead(s) {', '.join(missing)} missing from the header "
                        f"(it has {' '.join(hdr.names)})", label)
    return [canon.index(w) for w in leads]


def check_values(d: np.ndarray, invalid: np.ndarray, names, label: str) -> None:
    """NaN (invalid) samples and flat leads are faults; the message names the leads."""
    if invalid.any():
        cols = np.flatnonzero(invalid.any(axis=0))
        raise DataError(f"{int(invalid.sum())} NaN (missing) sample(s) in lead(s) "
                        f"{', '.join(names[i] for i in cols)}", label)
    flat = np.flatnonzero(d.min(axis=0) == d.max(axis=0))
    if flat.size:
        raise DataError(f"flat signal: lead(s) {', '.join(names[i] for i in flat)} hold a "
                        f"single constant value", label)


def to_mv(d: np.ndarray, hdr: Header, cols) -> np.ndarray:
    """Physical values exactly as wfdb computes them: (float64(d) - baseline) / gain."""
    cols = list(cols)
    p = d[:, cols].astype(np.float64)
    p -= np.asarray([hdr.baselines[c] for c in cols], dtype=np.float64)
    p /= np.asarray([hdr.gains[c] for c in cols], dtype=np.float64)
    return p


def read_any_record(path: str | Path) -> tuple[np.ndarray, int, list[str]]:
    """Any WFDB record for `predict`: (x (n_ch, T) float64 mV, fs, names); see signal.py."""
    base = split_record_path(path)
    d, hdr, invalid = read_digital(base, str(base))
    if invalid.any():
        check_values(d, invalid, hdr.names, str(base))
    names = [n.strip().upper() if n.strip().upper() in LEADS else n.strip() for n in hdr.names]
    if int(hdr.fs) != hdr.fs:
        raise DataError(f"sampling rate {hdr.fs} Hz is not a whole number", str(base))
    return to_mv(d, hdr, range(hdr.n_sig)).T.copy(), int(hdr.fs), names


def write_fmt16(base: str | Path, digital: np.ndarray, fs: int, names, gain: float = 1000.0) -> None:
    """Write a WFDB fmt-16 record (`base`.hea + `base`.dat) from int16 (n_sig, T) samples.

    The header carries real checksums and first values so that readers (ours and wfdb)
    can detect damage. Format follows PTB-XL's own headers byte for byte.
    """
    base = Path(base)
    d = np.ascontiguousarray(np.asarray(digital, dtype="<i2").T)  # (T, n_sig) interleaved
    n_sig = d.shape[1]
    sums = d.sum(axis=0, dtype=np.int64) % 65536
    dat = base.name + ".dat"
    lines = [f"{base.name} {n_sig} {fs} {d.shape[0]}"]
    lines += [f"{dat} 16 {gain:.1f}(0)/mV 16 0 {d[0, i]} {sums[i]} 0 {names[i]}"
              for i in range(n_sig)]
    base.with_name(base.name + ".hea").write_text("\n".join(lines) + "\n")
    d.tofile(base.with_name(dat))

"""Signal helpers shared by the cache, the engine and `predict`.

All functions work along the last axis (time), so they accept one record (n_leads, T)
or a batch (n, n_leads, T) alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from pathlib import Path

import numpy as np

from ecgsearch.data.errors import DataError
from ecgsearch.leads import LEADS


def resample(x: np.ndarray, fs_in: int, fs_out: int) -> np.ndarray:
    """Polyphase resampling from `fs_in` to `fs_out` Hz along the last axis.

    `resample_poly` applies its own anti-aliasing FIR filter, which is what makes
    500 -> 100 Hz match PTB-XL's distributed low-rate files closely. Float inputs keep
    their dtype (float32 stays float32 so batches do not double in size).
    """
    for name, fs in (("fs_in", fs_in), ("fs_out", fs_out)):
        if int(fs) != fs or fs <= 0:
            raise ValueError(f"resample: {name} must be a positive integer in Hz, got {fs!r}")
    fs_in, fs_out = int(fs_in), int(fs_out)
    x = np.asarray(x)
    if fs_in == fs_out:
        return x.copy()
    # Imported here: scipy.signal costs a process about 40 MB, which only resampling needs.
    from scipy.signal import resample_poly

    g = gcd(fs_in, fs_out)
    y = resample_poly(x, fs_out // g, fs_in // g, axis=-1)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    return y.astype(dtype, copy=False)


def pad_or_crop(x: np.ndarray, length: int) -> np.ndarray:
    """Centred zero-padding (or centred crop) of the last axis to `length` samples.

    Centring keeps the 10 s recording in the middle of, e.g., Ribeiro's 4096-sample
    window, so no beats are lost at one end only. An odd surplus goes to the end.
    """
    if int(length) != length or length <= 0:
        raise ValueError(f"pad_or_crop: length must be a positive integer, got {length!r}")
    length = int(length)
    x = np.asarray(x)
    t = x.shape[-1]
    if t == length:
        return x.copy()
    if t > length:
        start = (t - length) // 2
        return x[..., start:start + length].copy()
    out = np.zeros(x.shape[:-1] + (length,), dtype=x.dtype)
    left = (length - t) // 2
    out[..., left:left + t] = x
    return out


def _canon(name: str) -> str:
    # Same rule as ecgsearch.leads.normalize_lead_name, but unknown channels
    # (a respiration trace, a rhythm strip label) keep their own name.
    return str(name).strip().upper()


def pick_leads(signal: np.ndarray, names: Sequence[str],
               wanted: Sequence[str] = LEADS) -> np.ndarray:
    """Rows of `signal` (n_ch, T) for the leads `wanted`, in that order, matched by name.

    Names match case-insensitively (aVR = AVR). Extra channels are allowed and ignored;
    a wanted lead that is absent, or a name given twice, is a `DataError` naming it.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(names):
        raise DataError(f"pick_leads: signal of shape {signal.shape} does not match "
                        f"{len(names)} channel names {list(names)}")
    keys = [_canon(n) for n in names]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise DataError(f"channel name(s) {', '.join(dup)} occur more than once in {list(names)}")
    pos = {k: i for i, k in enumerate(keys)}
    missing = [w for w in wanted if _canon(w) not in pos]
    if missing:
        raise DataError(f"lead(s) {', '.join(missing)} missing; the record has {' '.join(names)}")
    return signal[[pos[_canon(w)] for w in wanted]]


def read_any_record(path: str | Path) -> tuple[np.ndarray, int, list[str]]:
    """Read any WFDB record for prediction: (x (n_ch, T) float64 mV, fs, channel names).

    Accepts the record path with or without `.hea`/`.dat`. Lead names come back in
    canonical spelling where they are ECG leads (aVR -> AVR), other channels as written.
    """
    from ecgsearch.data.wfdbio import read_any_record as _read  # wfdbio imports this module
    return _read(path)

"""A cache at the model's geometry: resampled and padded once at `data prepare`, not per batch.

Ribeiro et al.'s ResNet reads 400 Hz x 4096 samples; PTB-XL ships 500 Hz x 5000. Resampling
(`resample_poly`) costs more than everything else in the input path together, and a training
would redo it for every batch of every epoch of every trial. `prepare --target-fs 400
--n-samples 4096` does it once: signals.npy then holds (n, 12, 4096) at 400 Hz, the same
storage type and gain as the native cache, and training reads it with no resampling at all.

int16 storage: resampled mV are rounded back to the native adu grid (1/gain mV; half a step,
0.5 uV at PTB-XL's gain 1000, is the most a sample moves). A resampled sample beyond int16's
range is clipped and its record listed in the manifest ("clipped"), never silently.
"""
from __future__ import annotations

import numpy as np

from ecgsearch.data import signal as sig

CHUNK = 256   # records per resampling pass: bounded memory whatever the dataset size


def validate_geometry(target_fs, n_samples) -> tuple[int, int] | None:
    """(target_fs, n_samples), or None when neither is given; clear errors for bad values."""
    if target_fs is None and n_samples is None:
        return None
    if target_fs is None or n_samples is None:
        raise ValueError("--target-fs and --n-samples go together (the model's rate and input length, "
                         "e.g. --target-fs 400 --n-samples 4096)")
    for name, v in (("target_fs", target_fs), ("n_samples", n_samples)):
        if int(v) != v or int(v) <= 0:
            raise ValueError(f"invalid setting {name}={v!r}: must be a positive integer")
    return int(target_fs), int(n_samples)


def conform_file(src: np.ndarray, dest: np.ndarray, fs_in: int, fs_out: int, gain: float,
                 ecg_ids) -> list[dict]:
    """Write `src` (n, 12, T) resampled to `fs_out` and centre-padded/cropped into `dest`
    (n, 12, n_samples), chunk by chunk. Returns the records with clipped samples."""
    clipped = []
    n_samples = dest.shape[2]
    for i in range(0, src.shape[0], CHUNK):
        x = np.asarray(src[i:i + CHUNK], dtype=np.float32)
        if src.dtype == np.int16:
            x /= np.float32(gain)
        x = sig.pad_or_crop(sig.resample(x, fs_in, fs_out), n_samples)
        if dest.dtype == np.int16:
            q = np.rint(x * np.float32(gain))
            over = np.abs(q) > np.iinfo(np.int16).max
            for k in np.flatnonzero(over.any(axis=(1, 2))):
                clipped.append({"ecg_id": int(ecg_ids[i + k]), "samples": int(over[k].sum())})
            np.clip(q, -np.iinfo(np.int16).max, np.iinfo(np.int16).max, out=q)
            dest[i:i + CHUNK] = q.astype(np.int16)
        else:
            dest[i:i + CHUNK] = x
    return clipped


def derive(npy, fs_in: int, geometry: tuple[int, int], gain: float, ecg_ids) -> dict:
    """Replace the native signals file `npy` by its model-geometry version; the manifest entry."""
    import os

    fs_out, n_samples = geometry
    src = np.load(npy, mmap_mode="r")
    tmp = f"{npy}.geometry.npy"
    dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(src.shape[0], src.shape[1], n_samples))
    clipped = conform_file(src, dest, fs_in, fs_out, gain, ecg_ids)
    dest.flush()
    native_len = int(src.shape[2])
    del src, dest
    os.replace(tmp, npy)
    return {"source_fs": int(fs_in), "source_n_samples": native_len, "fs": fs_out, "n_samples": n_samples,
            "resampler": "scipy.signal.resample_poly", "padding": "centred zeros (or centred crop)",
            "clipped": clipped}

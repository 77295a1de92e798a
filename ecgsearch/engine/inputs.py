"""From a prepared cache to model-ready float32 batches.

Batches are read straight from the memory-mapped cache, a few records at a time, so
concurrent trials and DDP workers on one node share the OS page cache instead of
each holding a private float copy of the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecgsearch.data import signal as sig
from ecgsearch.leads import lead_indices

# ResNet1d downsamples by 4 four times; U-ResNet halves up to 8 times: a multiple of 256
# satisfies every registered architecture (1000 -> 1024 at 100 Hz, 4000 -> 4096 at 400 Hz).
SAMPLE_MULTIPLE = 256


def resolve_geometry(source_fs: int, source_len: int, target_fs: int | None,
                     n_samples: int | None) -> tuple[int, int]:
    """(model sampling rate, model input length) for a cache of `source_len` samples at `source_fs`."""
    fs = int(target_fs or source_fs)
    resampled = int(round(source_len * fs / source_fs))
    if n_samples is None:
        n_samples = -(-resampled // SAMPLE_MULTIPLE) * SAMPLE_MULTIPLE
    return fs, int(n_samples)


@dataclass
class Normalizer:
    """Per-lead standardisation, fit on training folds only and stored in the checkpoint."""
    leads: tuple[str, ...]
    mean: np.ndarray  # (n_leads,)
    std: np.ndarray   # (n_leads,)

    @classmethod
    def fit(cls, chunks, leads: tuple[str, ...]) -> "Normalizer":
        """Per-lead moments over an iterable of (n, n_leads, T) mV chunks from training records.

        Streaming keeps a trial's peak memory at one chunk, whatever the sample size.
        """
        n, s1, s2 = 0, 0.0, 0.0
        for x in chunks:
            x = x.astype(np.float64)
            n += x.shape[0] * x.shape[2]
            s1 = s1 + x.sum(axis=(0, 2))
            s2 = s2 + np.square(x).sum(axis=(0, 2))
        if n == 0:
            raise ValueError("cannot fit a normaliser on zero training records")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        flat = [lead for lead, s in zip(leads, std) if not s > 1e-8]
        if flat:
            raise ValueError(f"lead(s) {', '.join(flat)} are flat over the training folds; cannot normalise")
        return cls(tuple(leads), mean.astype(np.float32), std.astype(np.float32))

    def affine(self, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) float32 per lead with x * scale + shift = (x / gain - mean) / std.

        Why not the divisions: two float32 divisions per sample bounded the loader at 2.1 ms per
        batch of 64 at (12, 4096) on one core; the multiply and the add take 0.7 ms. Both
        factors are worked out in float64 and rounded once. Every path (host batches, the loader
        on CPU or GPU, serving) normalises through them, so their batches stay bit-identical.
        """
        std = self.std.astype(np.float64)
        return ((1.0 / (float(gain) * std)).astype(np.float32),
                (-self.mean.astype(np.float64) / std).astype(np.float32))

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, gain: float = 1.0) -> np.ndarray:
        """(x / gain - mean) / std per lead as float32, for mV (gain 1) or int16 adu (the cache's
        gain); into `out` (may be x itself) when given, without a batch-sized temporary."""
        scale, shift = self.affine(gain)
        if x.shape[-2] != len(self.leads):
            raise ValueError(f"normaliser of {len(self.leads)} leads ({','.join(self.leads)}) given "
                             f"{x.shape[-2]} leads (shape {tuple(x.shape)})")
        # int16 -> float32 is exact, so casting inside the multiply changes no number
        out = np.multiply(x, scale[:, None], out=out, dtype=np.float32, casting="same_kind")
        return np.add(out, shift[:, None], out=out)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return x * self.std[None, :, None] + self.mean[None, :, None]

    def to_dict(self) -> dict:
        return {"leads": list(self.leads), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(tuple(d["leads"]), np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))

    def subset(self, leads: tuple[str, ...]) -> "Normalizer":
        idx = lead_indices(leads, self.leads)
        return Normalizer(tuple(leads), self.mean[idx], self.std[idx])


def conform(x: np.ndarray, fs_in: int, fs: int, n_samples: int) -> np.ndarray:
    """Resample (n, C, T) mV to `fs` and centre-pad/crop to `n_samples`, as float32."""
    if int(fs_in) != int(fs):
        x = sig.resample(x, int(fs_in), int(fs))
    return np.ascontiguousarray(sig.pad_or_crop(x, n_samples), dtype=np.float32)


RESAMPLE_ROWS = 16   # records per resampling call (SignalSource.read)


def adu_at(data, fs: int) -> bool:
    """`data` stores int16 adu at `fs` Hz."""
    signals = getattr(data, "signals", None)
    return signals is not None and signals.dtype == np.int16 and int(data.fs) == int(fs)


class SignalSource:
    """Reads model-geometry signals (mV, not normalised) for record indices of one cache."""

    def __init__(self, data, leads: tuple[str, ...], fs: int, n_samples: int):
        self.data, self.leads, self.fs, self.n_samples = data, tuple(leads), int(fs), int(n_samples)

    @property
    def reads_adu(self) -> bool:
        """int16 storage at the model's rate: batches are normalised straight from adu (the
        loader ships these as int16 and normalises them where the model runs)."""
        return adu_at(self.data, self.fs)

    def read_adu(self, idx: np.ndarray) -> np.ndarray:
        """int16 adu at the model's length (centred zero padding: 0 adu = 0 mV); `reads_adu` only."""
        raw = self.data.signals_raw(np.asarray(idx), leads=self.leads)
        return raw if raw.shape[2] == self.n_samples else sig.pad_or_crop(raw, self.n_samples)

    def read(self, idx: np.ndarray) -> np.ndarray:
        # signals_mv reads rows in file order (memory-mapped pages stream) and returns them as asked.
        idx = np.asarray(idx)
        if int(self.data.fs) == self.fs:
            return conform(self.data.signals_mv(idx, leads=self.leads), self.data.fs, self.fs, self.n_samples)
        # Resampling a few records at a time: resample_poly works in float64 on a copy of its
        # input, so a whole batch (or a 256-record normaliser chunk) at 500 Hz would make ~300 MB
        # of temporaries per call, per concurrent trial. Rows are resampled independently: the
        # same numbers as one call.
        out = np.empty((len(idx), len(self.leads), self.n_samples), np.float32)
        for i in range(0, len(idx), RESAMPLE_ROWS):
            part = idx[i:i + RESAMPLE_ROWS]
            out[i:i + len(part)] = conform(self.data.signals_mv(part, leads=self.leads), self.data.fs, self.fs,
                                           self.n_samples)
        return out

    def iter_chunks(self, idx: np.ndarray, chunk: int = 256):
        for i in range(0, len(idx), chunk):
            yield self.read(idx[i:i + chunk])

"""Recording artifacts of one record, drawn once and rendered on the nine electrodes.

Real PTB-XL records carry baseline wander, muscle (EMG) noise, 50 Hz mains hum and electrode
motion; the database flags them in `baseline_drift`, `static_noise`, `burst_noise` and
`electrodes_problems`. Here they live on the electrodes (RA LA LL V1-V6) and reach the leads
through the cart's wiring (dipole.ELECTRODE_MATRIX), so III = II - I holds for them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAINS_HZ = 50.0  # PTB-XL was recorded in Germany


@dataclass
class Artifacts:
    white: float            # white noise SD (mV) at 500 Hz
    wander: float           # baseline wander amplitude (mV)
    emg: float              # muscle-noise burst SD (mV), 0 for none
    mains: float            # mains amplitude (mV), 0 for none
    motion: float           # electrode-motion step size (mV), 0 for none

    def flags(self) -> dict[str, str | float]:
        """PTB-XL's noise columns for this record (NaN where clean, as in the database)."""
        nan = float("nan")
        return {"baseline_drift": ", alles" if self.wander > 0.06 else nan,
                "static_noise": ", alles" if self.mains > 0 or self.white > 0.03 else nan,
                "burst_noise": ", alles" if self.emg > 0 else nan,
                "electrodes_problems": "motion" if self.motion > 0 else nan}

    def electrode_noise(self, t: np.ndarray, fs: int, rng: np.random.Generator) -> np.ndarray:
        """(9, len(t)) float32 mV of noise on the electrodes."""
        n = t.size
        elec = rng.standard_normal((9, n), dtype=np.float32)
        elec *= np.float32(self.white)
        # Baseline wander (< 0.5 Hz, mostly respiration): two sinusoids per electrode on a
        # 25 Hz grid, interpolated (smooth, and full-rate sin() was half the cost).
        f = rng.uniform(0.05, 0.5, size=(9, 2, 1))
        ph = rng.uniform(0, 2 * np.pi, size=(9, 2, 1))
        amp = self.wander * rng.uniform(0.2, 1.0, size=(9, 2, 1))
        tc = t[::max(fs // 25, 1)]
        coarse = (amp * np.sin(2 * np.pi * f * tc + ph)).sum(axis=1)
        for e in range(9):
            elec[e] += np.interp(t, tc, coarse[e]).astype(np.float32)
        if self.emg > 0:
            # Muscle noise: broadband bursts of 0.5-3 s, strongest on the limb electrodes
            # (the patient's arms and legs), high-passed by differencing.
            for _ in range(int(rng.integers(1, 4))):
                start, dur = int(rng.uniform(0, n)), int(rng.uniform(0.5, 3.0) * fs)
                seg = slice(start, min(n, start + dur))
                m = seg.stop - seg.start
                if m < 4:
                    continue
                burst = np.diff(rng.standard_normal((9, m + 1)), axis=1) * np.hanning(m)
                which = np.r_[rng.uniform(0.6, 1.0, 3), rng.uniform(0.1, 0.5, 6)]
                elec[:, seg] += (self.emg * which[:, None] * burst).astype(np.float32)
        if self.mains > 0 and fs > 2 * MAINS_HZ:
            # Mains hum couples mostly through the limb cables; above the 100 Hz files'
            # Nyquist rate, so their decimation filter removes it as on real low-rate files.
            ph = rng.uniform(0, 2 * np.pi)
            hum = np.sin(2 * np.pi * MAINS_HZ * t + ph).astype(np.float32)
            elec[:3] += (self.mains * rng.uniform(0.5, 1.0, (3, 1)) * hum).astype(np.float32)
        if self.motion > 0:
            # Electrode motion: a step on one electrode recovering over 0.2-1 s.
            e = int(rng.integers(0, 9))
            k = int(rng.uniform(0, n))
            tau = rng.uniform(0.2, 1.0) * fs
            step = self.motion * rng.choice([-1.0, 1.0]) * np.exp(-np.arange(n - k) / tau)
            elec[e, k:] += step.astype(np.float32)
        return elec


def draw_artifacts(rng: np.random.Generator, realism) -> Artifacts:
    lo, hi = realism.wander
    return Artifacts(
        white=float(rng.uniform(0.003, 0.012)),  # real 500 Hz PTB-XL traces are quiet between waves
        wander=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
        emg=float(rng.uniform(0.01, 0.05)) if rng.random() < realism.emg_p else 0.0,
        mains=float(rng.uniform(0.005, 0.03)) if rng.random() < realism.mains_p else 0.0,
        motion=float(rng.uniform(0.2, 1.0)) if rng.random() < realism.motion_p else 0.0)

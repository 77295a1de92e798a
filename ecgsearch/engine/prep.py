"""Everything between a cache and a loss: split indices, targets, normalisation, batches.

Shared by `train` and `evaluate` so a checkpoint is scored with exactly the preprocessing
it was trained with.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ecgsearch.data.cache import adu_to_mv
from ecgsearch.engine.config import TrainConfig
from ecgsearch.engine.inputs import Normalizer, SignalSource, resolve_geometry
from ecgsearch.engine.runtime import autocast
from ecgsearch.leads import LEADS, lead_indices
from ecgsearch.tasks import Task, get_task

# Records used to fit the per-lead normaliser: enough for stable moments, cheap on full PTB-XL.
NORM_FIT_RECORDS = 2000
log = logging.getLogger("ecgsearch.engine")
_told_resampling: set = set()     # (cache, rates, length) already reported in this process


def _report_resampling(data, fs: int, n_samples: int, idx: np.ndarray) -> None:
    """Say once per process and geometry that batches are resampled on the fly, and what it costs."""
    key = (str(getattr(data, "path", id(data))), int(data.fs), fs, n_samples)
    if int(data.fs) == fs or key in _told_resampling or len(idx) == 0:
        return
    _told_resampling.add(key)
    from ecgsearch.data import signal as sig

    x = data.signals_mv(np.sort(idx[:64]))
    # Untimed first call: it imports scipy.signal (about 0.6 s once per process), which is no
    # per-batch cost; timing it made the figure read ~10x slower than batches are.
    sig.resample(x[:1], int(data.fs), fs)
    t0 = time.perf_counter()
    sig.resample(x, int(data.fs), fs)
    per = (time.perf_counter() - t0) / len(x)
    log.warning("resampling %d -> %d Hz on the fly in every batch: %.2f ms per record on this thread (%.0f "
                "records/s at most); resample once with `ecgsearch data prepare --fs %d --target-fs %d "
                "--n-samples %d`", int(data.fs), fs, 1e3 * per, 1 / per, int(data.fs), fs, n_samples)


@dataclass
class Prepared:
    task: Task
    leads: tuple[str, ...]          # model input leads
    source: SignalSource            # reads input leads, or all 12 for reconstruction
    in_pos: list[int] | None        # reconstruction: input lead positions within the 12
    norm: Normalizer
    target_norm: Normalizer | None  # reconstruction: the 12-lead target normaliser
    target_state: dict

    @property
    def fs(self) -> int:
        return self.source.fs

    @property
    def n_samples(self) -> int:
        return self.source.n_samples

    @property
    def num_outputs(self) -> int:
        return len(LEADS) if self.task.kind == "reconstruction" else self.task.num_outputs()


def split_indices(data, task: Task, splits: dict, split: str, keep_unlabeled: bool = False) -> np.ndarray:
    """Record indices of a split, less those the task cannot use (missing age; for superclass,
    records without a superclass statement unless keep_unlabeled, see `Task.sample_mask`).

    Pass the run's `cfg.keep_unlabeled` so train, validation and test folds follow one rule.
    """
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(splits)}")
    folds = data.meta["strat_fold"].to_numpy()
    idx = np.flatnonzero(np.isin(folds, splits[split]))
    n_folds = len(idx)
    if n_folds:
        idx = idx[task.sample_mask(data, idx, keep_unlabeled=keep_unlabeled)]
    if len(idx) == 0:
        why = f" (all {n_folds} records in those folds lack a usable {task.name} label or target)" if n_folds else ""
        raise ValueError(f"split {split!r} (folds {splits[split]}) holds no usable records for task "
                         f"{task.name!r}{why}")
    return idx


def fit(cfg: TrainConfig, data) -> tuple[Prepared, np.ndarray]:
    """Resolve geometry, fit normalisers and target state on the training folds only."""
    task = get_task(cfg.task)
    fs, n_samples = resolve_geometry(data.fs, data.n_samples, cfg.target_fs, cfg.n_samples)
    train_idx = split_indices(data, task, cfg.splits, "train", keep_unlabeled=cfg.keep_unlabeled)
    _report_resampling(data, fs, n_samples, train_idx)
    recon = task.kind == "reconstruction"
    source = SignalSource(data, LEADS if recon else cfg.leads, fs, n_samples)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.permutation(train_idx)[:NORM_FIT_RECORDS])
    full_norm = Normalizer.fit(source.iter_chunks(sample), source.leads)
    if recon:
        norm, target_norm, target_state = full_norm.subset(cfg.leads), full_norm, {}
    else:
        norm, target_norm = full_norm, None
        target_state = task.fit_target_state(task.targets(data, train_idx))
    prep = Prepared(task, tuple(cfg.leads), source, lead_indices(cfg.leads) if recon else None,
                    norm, target_norm, target_state)
    return prep, train_idx


def from_checkpoint(ck, data) -> Prepared:
    task = get_task(ck.cfg.task)
    recon = task.kind == "reconstruction"
    source = SignalSource(data, LEADS if recon else ck.leads, ck.fs, ck.n_samples)
    return Prepared(task, tuple(ck.leads), source, lead_indices(ck.leads) if recon else None,
                    ck.norm, ck.target_norm, ck.target_state)


def batch(prep: Prepared, data, idx: np.ndarray, with_natural: bool = False):
    """(x normalised, y encoded[, y natural]) float32 arrays for record indices `idx`."""
    if prep.source.reads_adu:       # normalised from adu, as the loader does: the same numbers
        raw, gain = prep.source.read_adu(idx), float(prep.source.data.gain)
    else:
        raw, gain = prep.source.read(idx), 1.0
    if prep.in_pos is not None:
        x = prep.norm.apply(raw[:, prep.in_pos], gain=gain)
        y = prep.target_norm.apply(raw, gain=gain)
        natural = raw if raw.dtype == np.float32 else adu_to_mv(raw, gain)
    else:
        # raw is this call's own array: mV are normalised in place
        x = prep.norm.apply(raw, out=raw if raw.dtype == np.float32 else None, gain=gain)
        natural = prep.task.targets(data, idx)
        y = prep.task.encode_targets(natural, prep.target_state)
    out = (x, np.asarray(y, np.float32))
    return out + (natural,) if with_natural else out


def decode(prep: Prepared, out: np.ndarray) -> np.ndarray:
    if prep.target_norm is not None:
        return prep.target_norm.invert(out)
    return prep.task.decode_outputs(out, prep.target_state)


@torch.inference_mode()
def predict(model, prep: Prepared, data, idx: np.ndarray, *, batch_size: int, device, precision: str,
            drop_leads: tuple[str, ...] = (), loader=None) -> tuple[np.ndarray, np.ndarray]:
    """(y natural, prediction natural) over `idx`, in eval mode; batches come from `loader`
    (engine/loader.py; a fresh one on `device` when None).

    `drop_leads` removes leads at inference: ML-ResNet skips their branches, every other model
    sees them zeroed (0 is the training mean after normalisation, i.e. an uninformative lead).
    """
    from ecgsearch.engine.loader import Loader, chunked

    drop_pos = lead_indices(drop_leads, prep.leads) if drop_leads else []
    mask = None
    if drop_pos and hasattr(model, "select_leads"):
        mask = torch.ones(len(prep.leads), dtype=torch.bool, device=device)
        mask[drop_pos] = False
    model.eval()
    loader = loader or Loader(prep, data, device)
    ys, ps = [], []
    for b in loader.batches(chunked(np.asarray(idx), batch_size), with_natural=True, reuse=True):
        x = b.x
        if drop_pos and mask is None:
            x[:, drop_pos] = 0.0
        with autocast(device, precision):
            out = model(x) if mask is None else model(x, lead_mask=mask)
        ps.append(decode(prep, out.float().cpu().numpy()))
        ys.append(np.asarray(b.natural))
    return np.concatenate(ys), np.concatenate(ps)

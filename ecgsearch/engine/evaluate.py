"""Scoring checkpoints on cache splits, and serving them on arbitrary WFDB records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecgsearch.engine import prep as P
from ecgsearch.engine.checkpoint import Checkpoint, load_checkpoint
from ecgsearch.engine.inputs import conform
from ecgsearch.engine.runtime import autocast, pick_device, resolve_precision
from ecgsearch.engine.train import open_data
from ecgsearch.leads import lead_indices, parse_leads
from ecgsearch.metrics import f1_max_thresholds, operating_point_metrics
from ecgsearch.tasks import get_task


def _as_checkpoint(ck) -> Checkpoint:
    return ck if isinstance(ck, Checkpoint) else load_checkpoint(ck)


def predict_split(ck: Checkpoint | str | Path, data, split: str, *, drop_leads=(), splits: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record indices, targets, predictions) of a checkpoint on one split, in fp32.

    Scoring never runs under autocast: bf16 rounding would turn near-equal candidates into
    ties or flip their order, and a lead search compares exactly such candidates.
    `drop_leads` removes leads at inference (ML-ResNet skips their branches; others see zeros).
    """
    ck = _as_checkpoint(ck)
    data = open_data(data)
    drop = parse_leads(drop_leads) if drop_leads else ()
    if drop and not set(drop) <= set(ck.leads):
        raise ValueError(f"cannot drop lead(s) {', '.join(sorted(set(drop) - set(ck.leads)))}: "
                         f"the model reads only {','.join(ck.leads)}")
    if drop and len(drop) == len(ck.leads):
        raise ValueError("cannot drop every lead the model reads")
    prep = P.from_checkpoint(ck, data)
    idx = P.split_indices(data, prep.task, splits or ck.cfg.splits, split, keep_unlabeled=ck.cfg.keep_unlabeled)
    device = pick_device()
    y, p = P.predict(ck.model.to(device), prep, data, idx, batch_size=128, device=device, precision="fp32",
                     drop_leads=drop)
    return idx, y, p


def evaluate(ck: Checkpoint | str | Path, data, split: str = "test", *, bootstrap: int | None = None,
             drop_leads=(), seed: int = 0, splits: dict | None = None) -> dict:
    """The task's metrics for a checkpoint on one split (with bootstrap CIs when bootstrap > 0), in fp32.

    `drop_leads` scores the model with those leads removed at inference (the RLE's eval mode).
    """
    ck = _as_checkpoint(ck)
    drop = parse_leads(drop_leads) if drop_leads else ()
    idx, y, p = predict_split(ck, data, split, drop_leads=drop, splits=splits)
    n_boot = ck.cfg.bootstrap if bootstrap is None else bootstrap
    metrics = get_task(ck.cfg.task).compute_metrics(y, p, bootstrap=n_boot, seed=seed)
    metrics["split"] = split
    metrics["n_records"] = int(len(idx))
    if drop:
        metrics["dropped_leads"] = list(drop)
    return metrics


def operating_points(ck: Checkpoint | str | Path, data, split: str = "test", *, bootstrap: int | None = None,
                     seed: int = 0) -> dict | None:
    """F1, sensitivity and specificity on `split` at the checkpoint's validation-chosen thresholds.

    Multi-label tasks only (None otherwise). A checkpoint from before thresholds were stored
    gets them recomputed from its validation predictions, so the test fold never picks them.
    """
    ck = _as_checkpoint(ck)
    task = get_task(ck.cfg.task)
    if task.kind != "multilabel":
        return None
    data = open_data(data)
    thresholds = ck.thresholds
    if thresholds is None:
        _, y_val, p_val = predict_split(ck, data, "val")
        thresholds = dict(zip(task.output_names, f1_max_thresholds(y_val, p_val).tolist()))
    _, y, p = predict_split(ck, data, split)
    n_boot = ck.cfg.bootstrap if bootstrap is None else bootstrap
    out = operating_point_metrics(y, p, thresholds, task.output_names, bootstrap=n_boot, seed=seed)
    out["split"] = split
    out["threshold_split"] = "val"
    return out


class Predictor:
    """A checkpoint ready to serve: raw mV in, decoded outputs out (probabilities, years, or mV).

    `__call__` takes (n, leads, samples) float mV already in the input lead order, rate and length
    (what an MLflow pyfunc receives); the checkpoint's normaliser is applied here, so callers never
    see normalised units. `keep`: serve the model on a subset of its leads, as the lead search
    scored it: ML-ResNet skips the other branches, other models see those leads at their training
    mean (0 after normalisation). The input then holds only the `keep` leads.
    """

    def __init__(self, ck: Checkpoint | str | Path, device=None, keep=None) -> None:
        self.ck = _as_checkpoint(ck)
        self.prep = P.from_checkpoint(self.ck, _NoData())
        self.device = torch.device(device) if device is not None else pick_device()
        self.precision = resolve_precision(self.ck.precision if self.ck.precision in ("bf16", "fp32") else "auto",
                                           self.device)
        self.model = self.ck.model.to(self.device).eval()
        self.leads = tuple(self.ck.leads) if keep is None else tuple(parse_leads(keep))
        self.pos = lead_indices(self.leads, self.ck.leads)   # errors name leads the model lacks
        self.norm = self.ck.norm.subset(self.leads)
        self.mask = None
        if len(self.pos) < len(self.ck.leads) and hasattr(self.model, "select_leads"):
            self.mask = torch.zeros(len(self.ck.leads), dtype=torch.bool)
            self.mask[self.pos] = True

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.prep.task.output_names)

    def __call__(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        want = (len(self.leads), self.ck.n_samples)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"input of shape {tuple(x.shape)}: this model takes (n, {want[0]} leads "
                             f"[{','.join(self.leads)}], {want[1]} samples at {self.ck.fs} Hz) in mV")
        if not np.isfinite(x).all():
            raise ValueError("input holds NaN or infinite samples")
        outs = []
        for i in range(0, len(x), batch_size):
            xb = np.zeros((len(x[i:i + batch_size]), len(self.ck.leads), want[1]), dtype=np.float32)
            xb[:, self.pos] = self.norm.apply(x[i:i + batch_size])
            xt = torch.from_numpy(xb).to(self.device)
            with torch.inference_mode(), autocast(self.device, self.precision):
                out = self.model(xt) if self.mask is None else self.model(xt, lead_mask=self.mask.to(self.device))
            outs.append(out.float().cpu().numpy())
        return P.decode(self.prep, np.concatenate(outs) if outs else np.zeros((0, len(self.output_names))))


def predict_records(ck: Checkpoint | str | Path, paths, options=None) -> list[dict]:
    """Predictions for WFDB records of any rate, lead set and length: one dict per record (see
    engine/records.py: leads by name and alias, windows over long records, calls from thresholds).
    Raises on the first bad record, naming it; `RecordPredictor` with skip_bad reports and goes on."""
    from ecgsearch.engine.records import RecordPredictor

    return RecordPredictor(ck, options)(paths).rows


class _NoData:
    """Stands in for a cache when only the checkpoint's preprocessing is needed (no records read)."""
    fs = 0
    n_samples = 0

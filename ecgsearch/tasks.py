"""Learning tasks: what to predict from an ECGCache, with which loss and which metric.

A task is a frozen description plus a handful of pure methods. Anything learned
from the training folds (class pos_weight, age mean/std, the age histogram) is a
JSON-able `state` dict that the engine stores in the checkpoint, so the loss and
the decoding of outputs are reproducible from the checkpoint alone.

Task             kind            outputs            loss                       selection
rhythm           multilabel      6 rhythm codes     BCE, per-class pos_weight  macro_auprc (max)
superclass       multilabel      5 superclasses     BCE, per-class pos_weight  macro_auprc (max)
age              regression      age (years)        L1 | weighted MSE | MSE    mae (min)
reconstruct      reconstruction  all 12 leads (mV)  L1 | MSE                   mean_r (max)

Which records a task uses (`sample_mask`): superclass drops records with no superclass
statement, as Strodthoff et al. 2020 do for the PTB-XL benchmark (such a record is not
"no disease", it is undiagnosed), unless keep_unlabeled=True. Rhythm keeps them: a record
with none of the six codes is a valid negative. Age drops records without an age.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgsearch import metrics
from ecgsearch.leads import LABEL_SETS, LEADS

# Width of the age bins for the inverse-frequency weighted MSE (Lima et al. 2021 weight
# each training ECG by the inverse frequency of its age). 5-year bins rather than 1-year:
# PTB-XL has only a handful of records at some single ages, and 1-year bins would give
# those records weights in the hundreds and make the loss noisy.
AGE_BIN_WIDTH = 5.0
# Ages are whole years; decoding a standardised target back to years can land at
# 44.9999 for 45, so bins are looked up with this slack.
_BIN_EPS = 1e-4


def _check_opts(task: str, opts: dict, allowed: dict[str, tuple[str, ...]]) -> dict[str, str]:
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"task {task}: unknown loss option(s) {', '.join(unknown)}; known options: {known}")
    for key, value in opts.items():
        if value not in allowed[key]:
            raise ValueError(f"task {task}: loss option {key}={value!r} is not one of {', '.join(allowed[key])}")
    return {key: opts.get(key, choices[0]) for key, choices in allowed.items()}


class _ShapeChecked(nn.Module):
    """Wraps an element-wise loss and refuses mismatched shapes.

    Without this, (n, 1) outputs against (n,) targets broadcast to (n, n) and train
    on nonsense without any error.
    """

    def __init__(self, task: str, inner: nn.Module):
        super().__init__()
        self.task = task
        self.inner = inner

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.shape != targets.shape:
            raise ValueError(f"task {self.task}: loss got outputs {tuple(outputs.shape)} "
                             f"and targets {tuple(targets.shape)}; shapes must match")
        return self.inner(outputs.float(), targets.float())


class WeightedAgeMSE(nn.Module):
    """MSE on standardised ages, each sample weighted by the inverse frequency of its age bin.

    The weight table comes from the training histogram (state), normalised to mean 1
    over the training set, so the loss scale matches plain MSE. Targets arrive
    standardised; the bin is found by mapping them back to years.
    """

    def __init__(self, state: dict):
        super().__init__()
        self.mean = float(state["mean"])
        self.std = float(state["std"])
        self.bin_start = float(state["bin_start"])
        self.bin_width = float(state["bin_width"])
        self.register_buffer("bin_weights", torch.tensor(state["bin_weights"], dtype=torch.float32))

    def sample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        years = targets.float() * self.std + self.mean
        b = torch.floor((years - self.bin_start) / self.bin_width + _BIN_EPS).long()
        return self.bin_weights[b.clamp(0, self.bin_weights.numel() - 1)]

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = self.sample_weights(targets)
        return (w * (outputs.float() - targets.float()) ** 2).mean()


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    output_names: tuple[str, ...]
    selection_metric: str
    mode: str
    # A record whose label row is all zero carries no label (rather than "all negative"):
    # leave it out unless the caller asks to keep unlabeled records.
    requires_label: bool = False

    def num_outputs(self) -> int:
        return len(self.output_names)

    def sample_mask(self, data, idx, keep_unlabeled: bool = False) -> np.ndarray:
        """Which of the records `idx` this task can use (all, unless overridden)."""
        return np.ones(len(idx), dtype=bool)

    def targets(self, data, idx) -> np.ndarray:
        raise NotImplementedError

    def fit_target_state(self, train_targets) -> dict:
        return {}

    def encode_targets(self, y, state: dict) -> np.ndarray:
        return np.asarray(y, dtype=np.float32)

    def decode_outputs(self, out, state: dict) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)

    def make_loss(self, state: dict, **opts: Any) -> nn.Module:
        raise NotImplementedError

    def compute_metrics(self, y_true, y_pred, bootstrap: int = 0, seed: int = 0) -> dict:
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        """Is score a strictly better than b? NaN is never better; anything beats NaN."""
        if a is None or math.isnan(a):
            return False
        if b is None or math.isnan(b):
            return True
        return a > b if self.mode == "max" else a < b


@dataclass(frozen=True)
class MultiLabelTask(Task):
    def sample_mask(self, data, idx, keep_unlabeled: bool = False) -> np.ndarray:
        if not self.requires_label or keep_unlabeled:
            return np.ones(len(idx), dtype=bool)
        return self.targets(data, idx).any(axis=1)

    def targets(self, data, idx) -> np.ndarray:
        y = np.asarray(data.labels(self.name, idx), dtype=np.float32)
        if y.shape != (len(idx), self.num_outputs()):
            raise ValueError(f"task {self.name}: label matrix has shape {y.shape}, "
                             f"expected ({len(idx)}, {self.num_outputs()})")
        return y

    def fit_target_state(self, train_targets) -> dict:
        """pos_weight = negatives / positives per class, from the training folds."""
        y = np.asarray(train_targets, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != self.num_outputs():
            raise ValueError(f"task {self.name}: training targets must be (n, {self.num_outputs()}), got {y.shape}")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError(f"task {self.name}: training labels must be 0/1")
        pos = y.sum(axis=0)
        neg = y.shape[0] - pos
        none = [c for c, v in zip(self.output_names, pos) if v == 0]
        if none:
            raise ValueError(f"task {self.name}: class(es) {', '.join(none)} have no positive example in the "
                             f"{y.shape[0]} training records, so pos_weight is undefined; use more data or "
                             "another label set")
        every = [c for c, v in zip(self.output_names, neg) if v == 0]
        if every:
            raise ValueError(f"task {self.name}: class(es) {', '.join(every)} are positive in every one of the "
                             f"{y.shape[0]} training records; the class cannot be learned")
        return {"pos_weight": (neg / pos).tolist(), "positives": pos.astype(int).tolist(), "n": int(y.shape[0])}

    def decode_outputs(self, out, state: dict) -> np.ndarray:
        # sigmoid written via tanh: no overflow warning for large |logit|
        x = np.asarray(out, dtype=np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)

    def make_loss(self, state: dict, **opts: Any) -> nn.Module:
        _check_opts(self.name, opts, {})
        pw = state.get("pos_weight")
        if pw is None or len(pw) != self.num_outputs():
            raise ValueError(f"task {self.name}: state needs pos_weight with {self.num_outputs()} values; "
                             "call fit_target_state on the training targets")
        # BCEWithLogitsLoss keeps pos_weight as a buffer: loss.to(device) moves it with the model
        return _ShapeChecked(self.name, nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw, dtype=torch.float32)))

    def compute_metrics(self, y_true, y_pred, bootstrap: int = 0, seed: int = 0) -> dict:
        return metrics.classification_metrics(y_true, y_pred, self.output_names, bootstrap=bootstrap, seed=seed)


_AGE_STATE_KEYS = ("mean", "std", "bin_start", "bin_width", "bin_weights")


@dataclass(frozen=True)
class AgeTask(Task):
    def _check_state(self, state: dict) -> None:
        missing = [k for k in _AGE_STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"task {self.name}: target state lacks {', '.join(missing)}; "
                             "call fit_target_state on the training ages")

    def sample_mask(self, data, idx, keep_unlabeled: bool = False) -> np.ndarray:
        # PTB-XL has records without an age; they are excluded from this task, not imputed
        # (keep_unlabeled is about label rows and does not apply to a missing age).
        return ~np.isnan(np.asarray(data.ages(idx), dtype=np.float64))

    def targets(self, data, idx) -> np.ndarray:
        """Ages (n, 1) in years; NaN where missing (apply sample_mask)."""
        return np.asarray(data.ages(idx), dtype=np.float32).reshape(-1, 1)

    def fit_target_state(self, train_targets) -> dict:
        a = np.asarray(train_targets, dtype=np.float64).reshape(-1)
        if a.size < 2:
            raise ValueError(f"task {self.name}: need at least 2 training ages, got {a.size}")
        if np.isnan(a).any():
            raise ValueError(f"task {self.name}: {int(np.isnan(a).sum())} training age(s) are missing (NaN); "
                             "select records with sample_mask first")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"task {self.name}: training ages must be finite and >= 0")
        std = float(a.std())
        if std == 0.0:
            raise ValueError(f"task {self.name}: all {a.size} training ages equal {a[0]}; cannot standardise")
        start = math.floor(a.min() / AGE_BIN_WIDTH) * AGE_BIN_WIDTH
        bins = np.floor((a - start) / AGE_BIN_WIDTH + _BIN_EPS).astype(int)
        counts = np.bincount(bins).astype(np.float64)
        filled = counts > 0
        weights = np.zeros_like(counts)
        weights[filled] = a.size / (filled.sum() * counts[filled])   # mean 1 over the training ages
        # an empty bin inside the range (seen only in val/test) counts as rare as the rarest seen bin
        weights[~filled] = weights[filled].max()
        return {"mean": float(a.mean()), "std": std, "bin_start": float(start), "bin_width": AGE_BIN_WIDTH,
                "bin_counts": counts.astype(int).tolist(), "bin_weights": weights.tolist()}

    def encode_targets(self, y, state: dict) -> np.ndarray:
        self._check_state(state)
        return ((np.asarray(y, dtype=np.float64) - state["mean"]) / state["std"]).astype(np.float32)

    def decode_outputs(self, out, state: dict) -> np.ndarray:
        self._check_state(state)
        return (np.asarray(out, dtype=np.float64) * state["std"] + state["mean"]).astype(np.float32)

    def make_loss(self, state: dict, **opts: Any) -> nn.Module:
        kind = _check_opts(self.name, opts, {"age_loss": ("l1", "weighted_mse", "mse")})["age_loss"]
        self._check_state(state)
        if kind == "weighted_mse":
            return _ShapeChecked(self.name, WeightedAgeMSE(state))
        return _ShapeChecked(self.name, nn.L1Loss() if kind == "l1" else nn.MSELoss())

    def compute_metrics(self, y_true, y_pred, bootstrap: int = 0, seed: int = 0) -> dict:
        return metrics.regression_metrics(y_true, y_pred, bootstrap=bootstrap, seed=seed)


@dataclass(frozen=True)
class ReconstructionTask(Task):
    def targets(self, data, idx) -> np.ndarray:
        raise NotImplementedError(f"task {self.name}: the targets are the 12-lead signals themselves; "
                                  "the engine reads them with data.signals_mv(idx)")

    def make_loss(self, state: dict, **opts: Any) -> nn.Module:
        kind = _check_opts(self.name, opts, {"recon_loss": ("l1", "mse")})["recon_loss"]
        return _ShapeChecked(self.name, nn.L1Loss() if kind == "l1" else nn.MSELoss())

    def compute_metrics(self, y_true, y_pred, bootstrap: int = 0, seed: int = 0) -> dict:
        return metrics.reconstruction_metrics(y_true, y_pred, self.output_names, bootstrap=bootstrap, seed=seed)


_TASKS: dict[str, Task] = {
    "rhythm": MultiLabelTask("rhythm", "multilabel", LABEL_SETS["rhythm"], "macro_auprc", "max"),
    "superclass": MultiLabelTask("superclass", "multilabel", LABEL_SETS["superclass"], "macro_auprc", "max",
                                 requires_label=True),
    "age": AgeTask("age", "regression", ("age",), "mae", "min"),
    "reconstruct": ReconstructionTask("reconstruct", "reconstruction", LEADS, "mean_r", "max"),
}


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None

"""Checkpoints that carry everything needed to rebuild, resume and serve a model.

A checkpoint is a plain dict of tensors and JSON-like values so it loads with
`torch.load(weights_only=True)`: no pickled code ever runs when a checkpoint is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecgsearch.engine.config import TrainConfig
from ecgsearch.engine.inputs import Normalizer
from ecgsearch.models import create_model

FORMAT = "ecgsearch.ckpt/1"


@dataclass
class Checkpoint:
    model: torch.nn.Module
    cfg: TrainConfig
    leads: tuple[str, ...]
    fs: int
    n_samples: int
    norm: Normalizer
    target_norm: Normalizer | None
    target_state: dict
    epoch: int
    score: float
    val_metrics: dict
    precision: str
    extra: dict = field(default_factory=dict)  # resume state (optimizer, scheduler, best weights, history)
    # Multi-label tasks: per-class F1-max thresholds chosen on this checkpoint's validation
    # predictions (class name -> float, NaN for a class without validation positives).
    # None for other tasks and for checkpoints written before thresholds existed.
    thresholds: dict[str, float] | None = None


def to_payload(ck: Checkpoint, model_state: dict | None = None) -> dict[str, Any]:
    model = getattr(ck.model, "module", ck.model)  # unwrap DDP
    return {
        "format": FORMAT,
        "model_name": model.name,
        "model_config": dict(model.config),
        "model_state": model_state if model_state is not None else model.state_dict(),
        "train_config": ck.cfg.to_dict(),
        "leads": list(ck.leads),
        "fs": ck.fs,
        "n_samples": ck.n_samples,
        "norm": ck.norm.to_dict(),
        "target_norm": ck.target_norm.to_dict() if ck.target_norm else None,
        "target_state": ck.target_state,
        "epoch": ck.epoch,
        "score": ck.score,
        "val_metrics": ck.val_metrics,
        "precision": ck.precision,
        "extra": ck.extra,
        "thresholds": None if ck.thresholds is None else {str(k): float(v) for k, v in ck.thresholds.items()},
    }


def save_checkpoint(path: str | Path, ck: Checkpoint, model_state: dict | None = None) -> Path:
    """Write atomically (temp file + rename) so a kill mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_payload(ck, model_state), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        path = path / "model.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not an ecgsearch checkpoint (format {FORMAT} expected)")
    model = create_model(raw["model_name"], **raw["model_config"])
    model.load_state_dict(raw["model_state"])
    model.eval()
    return Checkpoint(
        model=model,
        cfg=TrainConfig.from_dict(raw["train_config"]),
        leads=tuple(raw["leads"]),
        fs=int(raw["fs"]),
        n_samples=int(raw["n_samples"]),
        norm=Normalizer.from_dict(raw["norm"]),
        target_norm=Normalizer.from_dict(raw["target_norm"]) if raw.get("target_norm") else None,
        target_state=raw["target_state"],
        epoch=int(raw["epoch"]),
        score=float(raw["score"]),
        val_metrics=raw["val_metrics"],
        precision=raw["precision"],
        extra=raw.get("extra") or {},
        thresholds=_thresholds(raw.get("thresholds")),
    )


def _thresholds(raw) -> dict[str, float] | None:
    return None if raw is None else {str(k): float(v) for k, v in raw.items()}

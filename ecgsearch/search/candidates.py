"""Work units of a lead search, and how one is done.

A *unit* is a JSON-able dict naming one piece of work:
- ``train``: train a model on a lead subset with one seed (a retrain candidate, an eval-mode
  step model, the shared masked model, a baseline), then predict the validation and test folds;
- ``predict``: a trained model's validation and test predictions with some leads removed at
  inference (an eval-mode candidate, a lead count or baseline of the shared model).

Every unit writes its predictions to ``preds`` (an .npz of record indices, targets and outputs
for both folds, fp32 inference): the search computes every score, margin and interval from
those arrays in the driver, so statistics never depend on where or how a trial ran.

`run_unit` does the work in the current process; `search.executors` runs batches of units (in
parallel Ray Tune trials, or one by one in-process). On Ray a training unit trains in its
trial's process (one worker, `raytrain.fit_in_trial`) or as a DDP TorchTrainer (`raytrain.fit`);
both commit an epoch checkpoint under the unit's folder, so a lost worker, trial or node resumes
from its last epoch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ecgsearch.search")
OnDone = Callable[[dict, dict], None]
SPLITS = ("val", "test")


class UnitError(RuntimeError):
    """A unit (trial) failed; the message names the unit and the cause.

    `failed` maps each failed unit id to its error, so the search can log those units as
    FAILED runs before it stops.
    """

    def __init__(self, message: str, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})


class SearchInterrupted(KeyboardInterrupt):
    """Tune stopped the batch before every trial finished (Ctrl-C, SIGTERM): resume later."""


# --------------------------------------------------------------------------- the work

def _threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(int(n))


# Eval-mode candidates read the same checkpoint and cache many times in one worker process
# (a reused Tune actor, or the local executor): load each once. Read-only, keyed by path.
_OPENED: dict[str, Any] = {}


def _opened(kind: str, path: str):
    key = f"{kind}:{Path(path).resolve()}"
    if key not in _OPENED:
        from ecgsearch.engine import load_checkpoint
        from ecgsearch.engine.train import open_data

        if len(_OPENED) > 32:
            _OPENED.clear()
        _OPENED[key] = load_checkpoint(path) if kind == "ckpt" else open_data(path)
    return _OPENED[key]


def save_predictions(path: str | Path, ckpt, data, drop=(), cached: bool = False) -> dict[str, Any]:
    """Predict val and test with `ckpt` (minus `drop` leads) into `path` (.npz, atomic)."""
    from ecgsearch.engine import predict_split

    ckpt = _opened("ckpt", str(ckpt)) if cached else ckpt
    data = _opened("data", str(data))
    arrays = {}
    for split in SPLITS:
        idx, y, p = predict_split(ckpt, data, split, drop_leads=tuple(drop))
        arrays.update({f"{split}_idx": np.asarray(idx), f"{split}_y": np.asarray(y, np.float32),
                       f"{split}_p": np.asarray(p, np.float32)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return {"preds": str(path), "n_val": int(len(arrays["val_idx"])), "n_test": int(len(arrays["test_idx"]))}


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _train(unit: dict) -> dict:
    from ecgsearch.engine import TrainConfig, train

    cfg = TrainConfig.from_dict(unit["config"])
    out_dir = Path(unit["out_dir"])
    workers = int(unit.get("workers", 1))
    on_ray = bool(unit.get("ray_train")) or workers > 1
    if on_ray:
        res = _train_on_ray(cfg, unit, out_dir, workers)
    else:
        # In-process (local executor): a unit is either finished (recorded in the search state)
        # or redone from scratch: a half-written folder must not leak its best checkpoint.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        r = train(cfg, unit["data"], out_dir)
        res = {"val_score": float(r.best_score), "best_epoch": int(r.best_epoch), "epochs_run": len(r.history),
               "checkpoint": str(r.checkpoint_path), "val_history": [float(h["score"]) for h in r.history]}
    res["budget"] = int(cfg.epochs)
    # Best epoch = last epoch: early stopping never triggered, the model was still improving.
    res["still_improving"] = res["best_epoch"] == res["epochs_run"]
    return {**res, **save_predictions(unit["preds"], res["checkpoint"], unit["data"])}


UNIT_FILE = "unit.json"   # what a unit folder's training run trains: resumed only when it matches
RAY_RUN = "train"         # the training run's name inside <unit out_dir>/ray: one run per unit, always


def _runner(unit: dict, workers: int) -> str:
    # "trial": the unit's Tune trial trains it; "torchtrainer": a Ray Train run, as `run_unit` called
    # outside a trial (a driver, a test) and every multi-worker unit do.
    return "trial" if workers == 1 and unit.get("runner") == "trial" else "torchtrainer"


def _unit_identity(unit: dict, workers: int) -> dict:
    # What decides the training's numbers and its folder's layout; fault injection and placement do not.
    return {"id": unit["id"], "config": unit["config"], "data": unit["data"], "workers": workers,
            "runner": _runner(unit, workers)}


def _reuse_or_reset(unit: dict, out_dir: Path, storage: Path, workers: int) -> bool:
    """Keep a unit folder whose Ray Train run trains this very unit (resume it); else start clean.

    True when an interrupted run is resumed. A folder from another config (or from the local
    executor, or one that never committed a checkpoint) is deleted so nothing of it leaks in.
    """
    from ecgsearch.distributed.raytrain import has_run

    identity = json.loads(json.dumps(_unit_identity(unit, workers)))   # as it reads back (tuples -> lists)
    marker = out_dir / UNIT_FILE
    try:
        saved = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, json.JSONDecodeError):
        saved = None
    if saved == identity and has_run(storage, RAY_RUN):
        log.info("unit %s: resuming its training run in %s", unit["id"], storage / RAY_RUN)
        return True
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(tmp, marker)
    return False


def _train_on_ray(cfg, unit: dict, out_dir: Path, workers: int) -> dict:
    """One training unit on Ray: in its own Tune trial's process (one worker, `runner` "trial") or
    as a W-worker TorchTrainer launched from wherever this runs.

    Epoch checkpoints go to <out_dir>/ray/train, the same folder for the same unit id, so a killed
    worker group (FailureConfig), a killed trial (Tune's retry) and an interrupted unit run again
    (`--resume`) all continue from the last committed epoch instead of from epoch 1.
    """
    from ecgsearch.distributed.raytrain import FAULT_KEYS, RayTrainSettings, export_best, fit, fit_in_trial
    from ecgsearch.engine import load_checkpoint

    storage = out_dir.resolve() / "ray"
    _reuse_or_reset(unit, out_dir, storage, workers)
    gpus = float(unit.get("gpus_per_worker", 0.0))
    faults = {k: unit[k] for k in FAULT_KEYS if unit.get(k) is not None}
    settings = RayTrainSettings(workers=workers, use_gpu=gpus > 0, gpus_per_worker=gpus or 1.0,
                                cpus_per_worker=float(unit.get("cpus_per_worker", 1.0)),
                                storage_path=str(storage), name=RAY_RUN, **faults)
    in_trial = _runner(unit, workers) == "trial"
    try:
        if in_trial:
            # The search reads each unit's result at its end: per-epoch reports would only fill Tune's logs.
            outcome = fit_in_trial(cfg, unit["data"], settings, report=lambda metrics: None)
        else:
            outcome = fit(cfg, unit["data"], settings)
    except Exception as exc:
        how = ("in its Tune trial" if in_trial
               else f"as a Ray Train run (after up to {settings.max_failures} restarts)")
        raise UnitError(f"unit {unit['id']}: training {storage / RAY_RUN} failed {how}: "
                        f"{type(exc).__name__}: {exc}") from exc
    if outcome.checkpoint_dir is None:
        raise UnitError(f"unit {unit['id']}: the training run {storage / RAY_RUN} committed no checkpoint")
    # The latest epoch checkpoint holds the whole history (restored across restarts) and the best
    # weights, so the result is the same whether or not the run was interrupted.
    history = load_checkpoint(outcome.checkpoint_dir).extra.get("history", [])
    best = export_best(outcome.checkpoint_dir, out_dir / "model.ckpt")
    return {"val_score": float(best.score), "best_epoch": int(best.epoch), "epochs_run": len(history),
            "checkpoint": str(out_dir / "model.ckpt"), "val_history": [float(h["score"]) for h in history]}


def _predict(unit: dict) -> dict:
    _threads(unit.get("threads"))
    return save_predictions(unit["preds"], unit["checkpoint"], unit["data"], unit.get("drop", ()), cached=True)


_KINDS: dict[str, Callable[[dict], dict]] = {"train": _train, "predict": _predict}


def run_unit(unit: dict) -> dict:
    """Do one unit in this process and return its JSON-able result."""
    fn = _KINDS.get(unit.get("kind"))
    if fn is None:
        raise UnitError(f"unit {unit.get('id')!r}: unknown kind {unit.get('kind')!r}")
    started = time.time()
    result = fn(unit)
    # Where and when it ran: shows in state.json how trials were spread over workers.
    result.update({"started": started, "finished": time.time(), "host": socket.gethostname(),
                   "pid": os.getpid()})
    return result

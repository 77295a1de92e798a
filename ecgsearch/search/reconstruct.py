"""Rebuild 12 leads from a kept subset (U-ResNet) and read the rebuilt ECG with a 12-lead classifier.

Answers the practical question after a lead search: if a device records only the kept
leads, is it better to rebuild the missing ones and use an existing 12-lead model, or to
feed that model the kept leads alone? Three test-fold numbers for the same classifier:
(a) true 12 leads, (b) rebuilt 12 leads, (c) kept leads only (others zeroed; an ML-ResNet
classifier skips their branches instead, which is its own notion of a missing lead).

In (b) the kept leads are the measured signals, and only the missing leads come from
the U-ResNet: a device has the kept leads, so replacing them with a reconstruction
would only add error.

Fidelity is averaged over the rebuilt leads only. The input leads come back through the
U-ResNet's linear bypass (or, without it, through an easy identity), so their r is close
to 1 whatever the model learned about the missing leads; counted in, they would make a
model that rebuilds nothing look good. They are reported apart, under "inputs".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgsearch.engine import TrainConfig, evaluate, load_checkpoint, open_data, train
from ecgsearch.engine import prep as P
from ecgsearch.engine.runtime import pick_device, resolve_precision
from ecgsearch.leads import LEADS, lead_indices, leads_key, parse_leads
from ecgsearch.metrics import reconstruction_metrics
from ecgsearch.tasks import get_task

log = logging.getLogger("ecgsearch.search")


@dataclass
class ReconstructSettings:
    data: str
    leads: tuple[str, ...]
    classifier: str                       # checkpoint of a classifier reading all 12 leads
    out: Path
    model: str = "uresnet"
    base: TrainConfig = field(default_factory=TrainConfig)
    epochs: int | None = None
    bootstrap: int | None = None          # None: the base config's
    tracking: bool = True                 # standalone runs only (`rle --reconstruct` logs in its search run)
    tracking_uri: str | None = None       # None: $MLFLOW_TRACKING_URI, else ./mlflow.db (one store per folder)
    experiment: str | None = None         # None: ecgsearch-<classifier task>, beside its studies and searches

    def __post_init__(self) -> None:
        self.leads = parse_leads(self.leads)
        self.out = Path(self.out)
        if len(self.leads) == len(LEADS):
            raise ValueError("--leads: all 12 leads given; reconstruction needs a reduced set")
        if not self.model.startswith("uresnet"):
            raise ValueError(f"invalid setting model={self.model!r}: reconstruction uses uresnet or uresnet_tiny")
        if not Path(self.classifier).exists():
            raise FileNotFoundError(f"--classifier {self.classifier}: no such checkpoint")

    def train_config(self) -> TrainConfig:
        # The U-ResNet must see whole records (n_samples None: the full length, padded to the
        # model's multiple) or the rebuilt records would be blank outside a crop. Architecture
        # overrides meant for a classifier (a search's base config) do not apply to it.
        kw: dict[str, Any] = {"model": self.model, "task": "reconstruct", "leads": self.leads, "n_samples": None}
        if not self.base.model.startswith("uresnet"):
            kw["model_kwargs"] = {}
        if self.epochs is not None:
            kw["epochs"] = int(self.epochs)
        return self.base.replace(**kw)


def rebuild_signals(recon_ckpt, data, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record indices, true mV, U-ResNet output mV) for `split`, both (n, 12, T) in the cache's geometry.

    The U-ResNet works at its own rate and padded length; the output is cropped and
    resampled back so the rebuilt records look exactly like cache records (and the
    per-lead r/RMSE never count the model's zero padding).
    """
    from ecgsearch.data import signal as sig

    ck = load_checkpoint(recon_ckpt) if not hasattr(recon_ckpt, "model") else recon_ckpt
    if ck.cfg.task != "reconstruct":
        raise ValueError(f"checkpoint {recon_ckpt} is a {ck.cfg.task!r} model, not a reconstruction model")
    data = open_data(data)
    prep = P.from_checkpoint(ck, data)
    idx = P.split_indices(data, prep.task, ck.cfg.splits, split)
    device = pick_device()
    precision = resolve_precision("fp32", device)
    _, rebuilt = P.predict(ck.model.to(device), prep, data, idx, batch_size=64, device=device, precision=precision)
    true = data.signals_mv(idx)   # cache geometry, all 12 leads
    length = int(round(data.n_samples * ck.fs / data.fs))
    rebuilt = sig.pad_or_crop(rebuilt, length)           # undo the model's centred padding
    if int(ck.fs) != int(data.fs):
        rebuilt = sig.resample(rebuilt, int(ck.fs), int(data.fs))
    rebuilt = np.asarray(sig.pad_or_crop(rebuilt, data.n_samples), dtype=np.float32)
    return idx, np.asarray(true, dtype=np.float32), rebuilt


# V1-V6: what a limb-lead or few-lead device lacks, so the summary a reader needs most.
PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")


def _lead_metrics(true: np.ndarray, rebuilt: np.ndarray, leads: tuple[str, ...], boot: int, seed: int) -> dict:
    return reconstruction_metrics(true[:, lead_indices(leads)], rebuilt[:, lead_indices(leads)], leads,
                                  bootstrap=boot, seed=seed)


def split_reconstruction_metrics(true: np.ndarray, rebuilt: np.ndarray, input_leads, *, bootstrap: int = 0,
                                 seed: int = 0) -> dict[str, Any]:
    """Per-lead r/RMSE of the U-ResNet output, kept apart for rebuilt and input leads.

    true, rebuilt: (n, 12, T) in LEADS order; `rebuilt` is the raw U-ResNet output (its
    input leads not yet replaced by the measured ones). The top level (mean_r, r, rmse,
    ci, n) covers the leads that were NOT inputs; "precordial" the same over V1-V6 minus
    the inputs (None when all six were inputs); "inputs" the input leads, shown apart.
    """
    inputs = parse_leads(input_leads)
    if len(inputs) == len(LEADS):
        raise ValueError("input_leads: all 12 leads given; nothing is rebuilt")
    true, rebuilt = np.asarray(true), np.asarray(rebuilt)
    if true.ndim != 3 or true.shape[1] != len(LEADS):
        raise ValueError(f"split_reconstruction_metrics: signals must be (n, 12, T) in {leads_key(LEADS)} order; "
                         f"got {true.shape}")
    built = tuple(x for x in LEADS if x not in inputs)
    precordial = tuple(x for x in built if x in PRECORDIAL)
    return {"input_leads": list(inputs), "rebuilt_leads": list(built),
            **_lead_metrics(true, rebuilt, built, bootstrap, seed),
            "precordial": _lead_metrics(true, rebuilt, precordial, bootstrap, seed) if precordial else None,
            "inputs": _lead_metrics(true, rebuilt, inputs, bootstrap, seed)}


def memory_cache(data, idx: np.ndarray, signals: np.ndarray, note: str):
    """An in-memory float32 ECGCache holding `signals` (mV) for records `idx` of `data`."""
    from ecgsearch.data.cache import ECGCache

    meta = data.meta.iloc[np.asarray(idx)].reset_index(drop=True)
    return ECGCache(signals=np.ascontiguousarray(signals, dtype=np.float32), gain=1.0, meta=meta,
                    fs=int(data.fs), leads=tuple(LEADS), manifest={**dict(data.manifest), "derived": note})


def run_reconstruct(s: ReconstructSettings) -> dict[str, Any]:
    """Train the U-ResNet, then score reconstruction and the classifier's three readings."""
    data = open_data(s.data)
    clf = load_checkpoint(s.classifier)
    if tuple(clf.leads) != LEADS:
        raise ValueError(f"--classifier {s.classifier} reads {leads_key(clf.leads)}; it must read all 12 leads")
    cfg = s.train_config()
    if list(cfg.splits["test"]) != list(clf.cfg.splits["test"]):
        raise ValueError(f"--classifier {s.classifier} uses test folds {clf.cfg.splits['test']} but the "
                         f"reconstruction uses {cfg.splits['test']}; they must score the same records")
    boot = cfg.bootstrap if s.bootstrap is None else int(s.bootstrap)
    log.info("reconstruct: training %s from %s", cfg.model, leads_key(s.leads))
    res = train(cfg, data, s.out / "uresnet")
    idx, true, rebuilt = rebuild_signals(res.state, data, "test")
    recon_metrics = split_reconstruction_metrics(true, rebuilt, s.leads, bootstrap=boot, seed=cfg.seed)
    kept = lead_indices(s.leads)
    rebuilt[:, kept] = true[:, kept]   # the device measured these: keep them
    rebuilt_cache = memory_cache(data, idx, rebuilt, f"test fold rebuilt from {leads_key(s.leads)}")
    missing = tuple(x for x in LEADS if x not in s.leads)
    readings = {
        "true_12": evaluate(clf, data, "test", bootstrap=boot, seed=cfg.seed),
        "rebuilt_12": evaluate(clf, rebuilt_cache, "test", bootstrap=boot, seed=cfg.seed),
        "kept_zeroed": evaluate(clf, data, "test", bootstrap=boot, seed=cfg.seed, drop_leads=missing),
    }
    n = {k: v.get("n_records") for k, v in readings.items()}
    if len(set(n.values())) != 1:
        raise ValueError(f"reconstruct: the three classifier readings scored different records {n}")
    return {"leads": list(s.leads), "leads_key": leads_key(s.leads), "model": cfg.model,
            "checkpoint": str(res.checkpoint_path), "val_score": float(res.best_score),
            "reconstruction": recon_metrics, "classifier": str(s.classifier),
            "classifier_model": clf.cfg.model, "classifier_metric": get_task(clf.cfg.task).selection_metric,
            "classifier_test": readings}


def log_reconstruction(tracker, run, result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Log a reconstruction under `run`: fidelity and the classifier's readings as metrics, and the
    U-ResNet as an MLflow model (`models/reconstruct`: raw mV of the kept leads in, 12 rebuilt leads
    out). Returns what was logged (for the result's "mlflow")."""
    from ecgsearch.tracking.pyfunc import save_pyfunc

    rec, metric = result["reconstruction"], result["classifier_metric"]
    metrics = {"recon_mean_r": rec["mean_r"],
               "recon_precordial_mean_r": (rec["precordial"] or {}).get("mean_r"),
               **{f"recon_r_{lead}": v for lead, v in rec["r"].items()},
               **{f"recon_rmse_{lead}": v for lead, v in rec["rmse"].items()},
               **{f"recon_{k}_{metric}": v[metric] for k, v in result["classifier_test"].items()}}
    tracker.log_metrics(run, {k: v for k, v in metrics.items() if v is not None})
    if not tracker.enabled:
        return {}
    dest = save_pyfunc(result["checkpoint"], Path(out) / "mlmodel")
    tracker.log_artifact(run, dest, "models/reconstruct")
    return {"model_artifact": "models/reconstruct", "model_folder": str(dest)}


def reconstruct_tracked(s: ReconstructSettings) -> dict[str, Any]:
    """`ecgsearch reconstruct`: `run_reconstruct`, its reports in OUT, and one MLflow run (in the store
    the studies and searches use) that ends FINISHED, FAILED or KILLED."""
    from ecgsearch.search.recon_report import reconstruction_markdown
    from ecgsearch.search.report import clean
    from ecgsearch.search.state import write_json
    from ecgsearch.tracking import make_tracker

    task = load_checkpoint(s.classifier).cfg.task
    tracker = make_tracker(s.tracking_uri, s.experiment or f"ecgsearch-{task}", s.out, s.tracking)
    cfg = s.train_config()
    run = tracker.parent(f"reconstruct-{leads_key(s.leads)}-{cfg.model}",
                         {"leads": leads_key(s.leads), "n_leads": len(s.leads), "classifier": str(s.classifier),
                          **{f"cfg.{k}": v for k, v in cfg.to_dict().items() if k not in ("leads", "task")}},
                         {"kind": "reconstruction", "task": task, "model": cfg.model, "leads": leads_key(s.leads),
                          "n_leads": len(s.leads)})
    try:
        result = clean(run_reconstruct(s))
        result["mlflow"] = {"tracking_uri": tracker.uri, "run_id": run,
                            **log_reconstruction(tracker, run, result, s.out)}
        write_json(s.out / "reconstruct.json", result)
        (s.out / "reconstruct.md").write_text(reconstruction_markdown(result))
        tracker.log_artifacts(run, [s.out / "reconstruct.json", s.out / "reconstruct.md"])
        tracker.end(run)
    except BaseException as exc:
        tracker.end(run, "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED", error=exc)
        raise
    finally:
        tracker.close()
    return result

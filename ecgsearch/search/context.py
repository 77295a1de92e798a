"""Shared machinery of the lead searches: settings, work units, memoised parallel execution.

`SearchContext.ensure(units)` is the one place work happens: units already in the
search state are skipped, the rest go to the executor as one parallel batch, and each
result is written to the state (and MLflow) the moment its trial finishes.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgsearch.engine import TrainConfig
from ecgsearch.leads import LEADS, leads_key, parse_leads
from ecgsearch.models import list_models
from ecgsearch.progress import Progress
from ecgsearch.search.candidates import load_predictions
from ecgsearch.search.executors import LocalExecutor, RayTuneExecutor, _safe
from ecgsearch.search.state import SearchState
from ecgsearch.tasks import get_task
from ecgsearch.tracking import NullTracker, Tracker, make_tracker

log = logging.getLogger("ecgsearch.search")

MODES = ("eval", "retrain")
EXECUTORS = ("ray", "local")


EVAL_MODELS = ("shared", "per-step")
# Non-inferiority margins on the test fold: 0.01 macro AUROC for classification (about 1 % of
# the scale, and below the spread of published PTB-XL models); for age 0.5 years of MAE, about
# 6 % of the ~8-year MAE of strong 12-lead models, the same order of "clinically negligible".
DEFAULT_MARGIN = {"classification": 0.01, "age": 0.5}
NI_METRIC = {"classification": "macro_auroc", "age": "mae"}


@dataclass
class SearchSettings:
    """Everything a lead search needs; the CLI and the job script only fill this in."""

    data: str
    task: str
    model: str
    out: Path
    mode: str = "eval"
    base: TrainConfig = field(default_factory=TrainConfig)   # hyperparameters (study or config file)
    start_leads: tuple[str, ...] = LEADS
    min_leads: int = 3
    repeats: int = 3                                       # seeds per training unit
    epochs: int = 30                                       # the search's epoch budget per training
    patience: int = 8                                      # early-stopping patience within it
    margin: float | None = None                            # None: DEFAULT_MARGIN for the task
    eval_model: str | None = None                          # None: shared for ML-ResNet, else per-step
    shared_lead_dropout: float = 0.5                       # subset lead dropout of the shared model
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None                    # None: one GPU per worker when the cluster has GPUs
    max_concurrent: int | None = None
    max_failures: int = 2                                  # restarts of a training from its last epoch (-1: forever)
    executor: str = "ray"
    tracking_uri: str | None = None                        # None: $MLFLOW_TRACKING_URI or sqlite in OUT
    tracking: bool = True
    experiment: str | None = None                         # None: ecgsearch-<task>, as studies
    baselines: bool = True
    resume: bool = False
    verbose: bool = False
    runtime_env: dict[str, Any] = field(default_factory=dict)   # Ray runtime_env when joining a cluster
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        if "://" not in str(self.data):   # a URI (s3://, gs://) is fetched by the cache layer
            self.data = str(Path(self.data).resolve())
            if not Path(self.data).exists():
                raise FileNotFoundError(f"--data {self.data}: no such cache (make one with `ecgsearch data prepare`)")
        self.start_leads = parse_leads(self.start_leads)
        if self.mode not in MODES:
            raise ValueError(f"invalid setting mode={self.mode!r}: choose eval or retrain")
        if self.executor not in EXECUTORS:
            raise ValueError(f"invalid setting executor={self.executor!r}: choose ray or local")
        for name in ("repeats", "epochs", "patience", "workers_per_trial"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"invalid setting {name}={getattr(self, name)!r}: must be a whole number >= 1")
        if self.executor == "local" and self.workers_per_trial > 1:
            raise ValueError(f"invalid settings workers_per_trial={self.workers_per_trial} with executor=local: "
                             "multi-worker training runs on Ray (use --executor ray)")
        if int(self.max_failures) != self.max_failures or self.max_failures < -1:
            raise ValueError(f"invalid setting max_failures={self.max_failures!r}: -1 (forever) or a whole number >= 0")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"invalid setting cpus_per_trial={self.cpus_per_trial}: must be > 0")
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(list_models())}")
        task = get_task(self.task)  # unknown task -> ValueError naming it
        if task.kind == "reconstruction":
            raise ValueError("invalid setting task='reconstruct' for a lead search: use `ecgsearch reconstruct`")
        kind = "age" if task.kind == "regression" else "classification"
        if self.margin is None:
            self.margin = DEFAULT_MARGIN[kind]
        if not self.margin > 0:
            raise ValueError(f"invalid setting margin={self.margin}: must be > 0 (in units of {NI_METRIC[kind]})")
        can_mask = self.model.startswith("mlresnet")
        if self.eval_model is None:
            self.eval_model = "shared" if can_mask else "per-step"
        if self.eval_model not in EVAL_MODELS:
            raise ValueError(f"invalid setting eval_model={self.eval_model!r}: choose shared or per-step")
        if self.mode == "eval" and self.eval_model == "shared" and not can_mask:
            raise ValueError(f"invalid setting eval_model=shared with model {self.model}: scoring every step by "
                             "masking one model needs a model that can drop leads (mlresnet); use per-step")
        if not 0 < self.shared_lead_dropout <= 1:
            raise ValueError(f"invalid setting shared_lead_dropout={self.shared_lead_dropout}: must be in (0, 1]")
        # The CLI's --task/--model win over the study/config file: they name the experiment. The
        # epoch budget and patience are the search's own: a study's short budget must not leak in.
        threads = max(1, int(self.cpus_per_trial)) if self.executor == "ray" else self.base.threads
        self.base = self.base.replace(task=self.task, model=self.model, threads=threads, epochs=int(self.epochs),
                                      early_stop_patience=int(self.patience))

    @property
    def shared(self) -> bool:
        return self.mode == "eval" and self.eval_model == "shared"

    @property
    def seeds(self) -> list[int]:
        """Training seeds: the config's seed and the R - 1 after it (shared by every candidate)."""
        return [int(self.base.seed) + r for r in range(int(self.repeats))]

    @property
    def metric(self) -> str:
        return get_task(self.task).selection_metric

    @property
    def metric_mode(self) -> str:
        return get_task(self.task).mode

    @property
    def ni_metric(self) -> str:
        return NI_METRIC["age" if get_task(self.task).kind == "regression" else "classification"]

    def fingerprint(self, kind: str, **extra: Any) -> dict[str, Any]:
        """Settings that change results; a resume must match them exactly."""
        cfg = self.base.to_dict()
        cfg.pop("leads")
        cfg.pop("threads")
        return {"kind": kind, "data": self.data, "task": self.task, "model": self.model, "mode": self.mode,
                "config": cfg, "workers_per_trial": int(self.workers_per_trial), "repeats": int(self.repeats),
                "eval_model": self.eval_model if self.mode == "eval" else None,
                "shared_lead_dropout": self.shared_lead_dropout if self.shared else None, **extra}


def slug(leads: Sequence[str]) -> str:
    """Folder name for a subset: 'I-II-V2' (canonical order, filesystem-safe)."""
    return leads_key(leads).replace(",", "-")


class SearchContext:
    def __init__(self, settings: SearchSettings, fingerprint: dict[str, Any]):
        self.s = settings
        self.out = settings.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = SearchState.open(self.out, fingerprint, settings.resume)
        experiment = settings.experiment or f"ecgsearch-{settings.task}"   # beside the task's studies
        uri = settings.tracking_uri
        if settings.tracking and not uri and not os.environ.get("MLFLOW_TRACKING_URI"):
            uri = self.state.info.get("tracking_uri")   # a resumed search logs where it began
        self.tracker: Tracker | NullTracker = make_tracker(uri, experiment, self.out, settings.tracking)
        if self.tracker.uri and self.state.info.get("tracking_uri") != self.tracker.uri:
            self.state.set_info("tracking_uri", self.tracker.uri)
        # Ray's own output (trial tables, worker logs, raylet notices) goes to OUT/ray.log unless
        # --verbose; the console keeps the progress display and the search's summary lines.
        self._stack = contextlib.ExitStack()
        try:
            if settings.executor == "ray":
                from ecgsearch.distributed.cluster import route_ray_output

                self._stack.enter_context(route_ray_output(self.out / "ray.log", settings.verbose))
                self.executor = RayTuneExecutor(self.out / "tune", cpus_per_trial=settings.cpus_per_trial,
                                                workers_per_trial=settings.workers_per_trial,
                                                gpus_per_trial=settings.gpus_per_trial,
                                                max_concurrent=settings.max_concurrent,
                                                max_failures=settings.max_failures,
                                                runtime_env=settings.runtime_env)
            else:
                self.executor = LocalExecutor()
        except BaseException:
            self._stack.close()
            raise
        self.ran: list[str] = []   # unit ids executed by this process (not taken from the state)
        self.progress = Progress(f"{fingerprint['kind']}", enabled=settings.progress and not settings.verbose)
        self._preds: dict[str, dict[str, np.ndarray]] = {}

    # -- units ------------------------------------------------------------------------
    def train_config(self, leads: Sequence[str], seed: int) -> TrainConfig:
        cfg = self.s.base.replace(leads=parse_leads(leads), seed=int(seed))
        if self.s.shared:
            # One model read at every subset size: subset lead dropout (see MLResNetConfig).
            kw = {**cfg.model_kwargs, "lead_dropout": self.s.shared_lead_dropout, "lead_dropout_mode": "subset"}
            cfg = cfg.replace(model_kwargs=kw)
        return cfg

    def train_unit(self, leads: Sequence[str], seed: int) -> dict:
        leads = parse_leads(leads)
        uid = f"train:{leads_key(leads)}@{seed}"
        return {"id": uid, "kind": "train", "leads": list(leads), "seed": int(seed),
                "config": self.train_config(leads, seed).to_dict(), "data": self.s.data,
                "out_dir": str(self.out / "models" / slug(leads) / f"seed{seed}"),
                "preds": str(self.preds_path(uid)), "workers": int(self.s.workers_per_trial)}

    def predict_unit(self, model_leads: Sequence[str], seed: int, keep: Sequence[str]) -> dict:
        """Predictions of the model trained on `model_leads` (seed) reading only `keep`."""
        model_leads, keep = parse_leads(model_leads), parse_leads(keep)
        if leads_key(keep) == leads_key(model_leads):
            return self.train_unit(model_leads, seed)   # nothing dropped: the training's own predictions
        drop = tuple(x for x in model_leads if x not in keep)
        uid = f"predict:{leads_key(model_leads)}@{seed}:{leads_key(keep)}"
        return {"id": uid, "kind": "predict", "leads": list(keep), "seed": int(seed), "drop": list(drop),
                "model_leads": list(model_leads), "checkpoint": str(self.checkpoint(model_leads, seed)),
                "data": self.s.data, "preds": str(self.preds_path(uid)), "threads": self.s.base.threads}

    def preds_path(self, uid: str) -> Path:
        return self.out / "preds" / (_safe(uid) + ".npz")

    def checkpoint(self, leads: Sequence[str], seed: int) -> Path:
        return self.out / self.state.get(f"train:{leads_key(leads)}@{seed}")["checkpoint"]

    def predictions(self, units: Sequence[dict], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record indices, targets, (R, n, k) predictions) of finished units, one per seed, same records."""
        arrays = [self._load(u["id"]) for u in units]
        idx = arrays[0][f"{split}_idx"]
        for u, a in zip(units, arrays):
            if not np.array_equal(a[f"{split}_idx"], idx):
                raise ValueError(f"unit {u['id']}: its {split} records differ from {units[0]['id']}'s; "
                                 "predictions of one comparison must cover the same records")
        y = arrays[0][f"{split}_y"]
        return idx, y.reshape(len(y), -1), np.stack([a[f"{split}_p"].reshape(len(y), -1) for a in arrays])

    def _load(self, uid: str) -> dict[str, np.ndarray]:
        if uid not in self._preds:
            self._preds[uid] = load_predictions(self.out / self.state.get(uid)["preds"])
        return self._preds[uid]

    # -- execution --------------------------------------------------------------------
    def ensure(self, units: Sequence[dict], label: str,
               on_result: Callable[[dict, dict], dict | None] | None = None, *, step: int | None = None,
               n_steps: int | None = None, remaining: int | None = None) -> list[dict]:
        """Results of `units` (in order), running only those not yet in the state.

        step/n_steps/remaining feed the progress display (remaining: units of the same kind
        expected after these, for the time-left estimate).
        """
        seen: dict[str, dict] = {}
        for u in units:
            seen.setdefault(u["id"], u)
        todo = [u for u in seen.values() if not self.state.done(u["id"])]
        if todo:
            log.debug("%s: %d unit(s) to run, %d already done", label, len(todo), len(seen) - len(todo))
            kinds = {u["kind"] for u in todo}
            self.progress.phase(label, len(todo), step=step, n_steps=n_steps,
                                kind=kinds.pop() if len(kinds) == 1 else "mixed")
            if remaining is not None:
                self.progress.plan(remaining)

            def done(unit: dict, result: dict) -> None:
                # Paths relative to OUT: a search folder stays valid when moved or mounted elsewhere.
                for key in ("checkpoint", "preds"):
                    if key in result:
                        result[key] = os.path.relpath(result[key], self.out)
                result["seed"] = int(unit["seed"])
                if on_result is not None:
                    result.update(on_result(unit, result) or {})
                # State first: a finished unit is on disk before anything else can fail.
                self.state.record(unit["id"], result)
                self.ran.append(unit["id"])
                self.progress.done()

            self.executor.run(todo, done, label)
        return [self.state.get(u["id"]) for u in units]

    def note(self, text: str) -> None:
        """A summary line for the console (above the progress display) and the log."""
        log.debug(text)
        self.progress.note(text)

    def close(self) -> None:
        self.progress.close()
        self.executor.close()
        self.tracker.close()   # bounded: what a dead server missed goes to OUT/tracking_backlog.json
        self._stack.close()

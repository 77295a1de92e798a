"""Shared machinery of the lead searches: settings, work units, memoised parallel execution.

`SearchContext.ensure(units)` is the one place work happens: units already in the
search state are skipped, the rest go to the executor as one parallel batch, and each
result is written to the state (and MLflow) the moment its trial finishes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgsearch.engine import TrainConfig
from ecgsearch.leads import LEADS, leads_key, parse_leads
from ecgsearch.models import list_models
from ecgsearch.search.candidates import LocalExecutor, RayTuneExecutor
from ecgsearch.search.state import SearchState
from ecgsearch.search.tracking import Tracker, make_tracker
from ecgsearch.tasks import get_task

log = logging.getLogger("ecgsearch.search")

MODES = ("eval", "retrain")
EXECUTORS = ("ray", "local")


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
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None                    # None: one GPU per worker when the cluster has GPUs
    max_concurrent: int | None = None
    executor: str = "ray"
    tracking_uri: str | None = None                        # None: $MLFLOW_TRACKING_URI or sqlite in OUT
    tracking: bool = True
    experiment: str = "ecgsearch-lead-search"
    baselines: bool = True
    resume: bool = False

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
        if int(self.workers_per_trial) < 1:
            raise ValueError(f"invalid setting workers_per_trial={self.workers_per_trial}: must be >= 1")
        if self.executor == "local" and self.workers_per_trial > 1:
            raise ValueError(f"invalid settings workers_per_trial={self.workers_per_trial} with executor=local: "
                             "multi-worker training runs on Ray (use --executor ray)")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"invalid setting cpus_per_trial={self.cpus_per_trial}: must be > 0")
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(list_models())}")
        task = get_task(self.task)  # unknown task -> ValueError naming it
        if task.kind == "reconstruction":
            raise ValueError("invalid setting task='reconstruct' for a lead search: use `ecgsearch reconstruct`")
        # The CLI's --task/--model win over the study/config file: they name the experiment.
        threads = max(1, int(self.cpus_per_trial)) if self.executor == "ray" else self.base.threads
        self.base = self.base.replace(task=self.task, model=self.model, threads=threads)

    @property
    def metric(self) -> str:
        return get_task(self.task).selection_metric

    @property
    def metric_mode(self) -> str:
        return get_task(self.task).mode

    def fingerprint(self, kind: str, **extra: Any) -> dict[str, Any]:
        """Settings that change results; a resume must match them exactly."""
        cfg = self.base.to_dict()
        cfg.pop("leads")
        cfg.pop("threads")
        return {"kind": kind, "data": self.data, "task": self.task, "model": self.model, "mode": self.mode,
                "config": cfg, "workers_per_trial": int(self.workers_per_trial), **extra}


def slug(leads: Sequence[str]) -> str:
    """Folder name for a subset: 'I-II-V2' (canonical order, filesystem-safe)."""
    return leads_key(leads).replace(",", "-")


class SearchContext:
    def __init__(self, settings: SearchSettings, fingerprint: dict[str, Any]):
        self.s = settings
        self.out = settings.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = SearchState.open(self.out, fingerprint, settings.resume)
        self.tracker: Tracker = make_tracker(settings.tracking_uri, settings.experiment, self.out,
                                               settings.tracking)
        if settings.executor == "ray":
            self.executor = RayTuneExecutor(self.out / "tune", cpus_per_trial=settings.cpus_per_trial,
                                            workers_per_trial=settings.workers_per_trial,
                                            gpus_per_trial=settings.gpus_per_trial,
                                            max_concurrent=settings.max_concurrent)
        else:
            self.executor = LocalExecutor()
        self.ran: list[str] = []   # unit ids executed by this process (not taken from the state)

    # -- units ------------------------------------------------------------------------
    def train_unit(self, leads: Sequence[str]) -> dict:
        leads = parse_leads(leads)
        return {"id": f"train:{leads_key(leads)}", "kind": "train", "leads": list(leads),
                "config": self.s.base.replace(leads=leads).to_dict(), "data": self.s.data,
                "out_dir": str(self.out / "models" / slug(leads)), "workers": int(self.s.workers_per_trial)}

    def drop_unit(self, model_leads: Sequence[str], drop: Sequence[str]) -> dict:
        model_leads, drop = parse_leads(model_leads), parse_leads(drop)
        kept = tuple(x for x in model_leads if x not in drop)
        return {"id": f"drop:{leads_key(model_leads)}-{leads_key(drop)}", "kind": "drop",
                "leads": list(kept), "drop": list(drop), "model_leads": list(model_leads),
                "checkpoint": str(self.checkpoint(model_leads)), "data": self.s.data,
                "metric": self.s.metric, "threads": self.s.base.threads}

    def test_unit(self, leads: Sequence[str]) -> dict:
        leads = parse_leads(leads)
        return {"id": f"test:{leads_key(leads)}", "kind": "test", "leads": list(leads),
                "checkpoint": str(self.checkpoint(leads)), "data": self.s.data,
                "bootstrap": int(self.s.base.bootstrap), "seed": int(self.s.base.seed),
                "threads": self.s.base.threads}

    def checkpoint(self, leads: Sequence[str]) -> Path:
        res = self.state.get(f"train:{leads_key(leads)}")
        return self.out / res["checkpoint"]

    def val_score(self, leads: Sequence[str]) -> float:
        return float(self.state.get(f"train:{leads_key(leads)}")["val_score"])

    # -- execution --------------------------------------------------------------------
    def ensure(self, units: Sequence[dict], label: str,
               on_result: Callable[[dict, dict], dict | None] | None = None) -> list[dict]:
        """Results of `units` (in order), running only those not yet in the state."""
        seen: dict[str, dict] = {}
        for u in units:
            seen.setdefault(u["id"], u)
        todo = [u for u in seen.values() if not self.state.done(u["id"])]
        if todo:
            log.info("%s: %d unit(s) to run, %d already done", label, len(todo), len(seen) - len(todo))

            def done(unit: dict, result: dict) -> None:
                if unit["kind"] == "train":
                    result["checkpoint"] = os.path.relpath(result["checkpoint"], self.out)
                    result["seed"] = int(unit["config"]["seed"])
                if on_result is not None:
                    result.update(on_result(unit, result) or {})
                self.state.record(unit["id"], result)
                self.ran.append(unit["id"])

            self.executor.run(todo, done, label)
        return [self.state.get(u["id"]) for u in units]

    def close(self) -> None:
        self.executor.close()

"""The Tune callback that records a study in MLflow and in `OUT/events.jsonl`, and the console
summary (`StudyDisplay`) that listens to those events.

It runs in the driver, on Tune's event loop, so it never calls MLflow itself: it queues calls
on the study's `ecgsearch.tracking.Tracker`, whose writer thread sends them (a dead tracking
server costs the study nothing but a backlog). The driver is the one writer however many
trials run at once. What it logs is rank 0's report: `TuneReportCallback` forwards exactly
that worker's metrics to Tune.

Tune pickles its callbacks into the experiment folder and hands the pickled copy back on
`Tuner.restore`, so this object keeps only plain settings; it finds the study's tracker with
`tracking.live(out)`, and the trial -> run map is rebuilt on demand (a resumed study's tracker
finds the runs again by their deterministic names under the reopened parent).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ecgsearch import tracking
from ecgsearch.leads import leads_key
from ecgsearch.tracking import root_cause, run_name

log = logging.getLogger("ecgsearch.tune")

# Tune's own bookkeeping keys: not model metrics, so not logged as such.
_TUNE_KEYS = {"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid", "time_since_restore",
              "iterations_since_restore", "done", "trial_id", "date", "hostname", "node_ip", "config",
              "checkpoint_dir_name", "experiment_tag", "should_checkpoint"}
SYSTEM_KEYS = ("device", "precision", "world_size")


def trial_run_name(study: str, trial_id: str) -> str:
    return run_name(study, f"trial-{trial_id}")


# Live listeners of a study's events in this driver, by events file. Not kept on the callback:
# Tune pickles its callbacks into the experiment folder and `Tuner.restore` hands back that
# pickled copy, which can carry no console display.
_listeners: dict[str, Callable[[dict], None]] = {}


@contextlib.contextmanager
def listen(events: Path | str, fn: Callable[[dict], None]) -> Iterator[None]:
    """Call `fn(row)` for every event appended to `events` within the block."""
    key = os.path.abspath(events)
    _listeners[key] = fn
    try:
        yield
    finally:
        _listeners.pop(key, None)


def append_event(path: Path, event: str, **fields: Any) -> None:
    """One JSON line per trial event, tagged with the driver pid (tests tell sessions apart by it)."""
    row = {"t": round(time.time(), 3), "pid": os.getpid(), "event": event, **fields}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    listener = _listeners.get(os.path.abspath(path))
    if listener is not None:
        try:
            listener(row)
        except Exception as exc:  # a display fault must not stop a study hours in
            log.error("study display failed on %s: %s", event, exc)


class StudyCallback(Callback):
    def __init__(self, *, uri: str, experiment: str, parent_id: str, study: str, events: str,
                 resolver, epochs: int) -> None:
        self.uri, self.experiment, self.parent_id, self.study = uri, experiment, parent_id, study
        self.events = events
        self.resolver = resolver    # sampled trial config -> decoded params / resolved TrainConfig
        self.epochs = epochs
        self._runs: dict[str, tracking.Run] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}}

    @property
    def tracker(self) -> tracking.Tracker:
        found = tracking.live(Path(self.events).parent)
        if found is None:   # not inside run_study (a tool replaying the callback): a tracker of its own
            found = tracking.Tracker(self.uri, self.experiment, Path(self.events).parent)
        return found

    def _run(self, trial) -> tracking.Run:
        if trial.trial_id not in self._runs:
            params = self.resolver.params(trial.config)
            cfg = self.resolver.config(trial.config)
            self._runs[trial.trial_id] = run = self.tracker.child(
                self.parent_id, trial_run_name(self.study, trial.trial_id),
                params={k: (v if not isinstance(v, (list, tuple)) else list(v)) for k, v in params.items()},
                tags={"kind": "trial", "trial_id": trial.trial_id, "leads": leads_key(cfg.leads),
                      "n_leads": len(cfg.leads)}, finish=False)
            self.tracker.log_config(run, cfg.to_dict())
        return self._runs[trial.trial_id]

    # -- Tune hooks ----------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        append_event(Path(self.events), "start", trial=trial.trial_id)
        self._guard(lambda: self._run(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        def log_result() -> None:
            run = self._run(trial)
            if all(k in result for k in SYSTEM_KEYS):
                self.tracker.tags(run, {f"system.{k}": result[k] for k in SYSTEM_KEYS})
            metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS and k not in SYSTEM_KEYS}
            self.tracker.log_metrics(run, metrics, int(result.get("epoch", 0)))
        self._guard(log_result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        append_event(Path(self.events), "complete", trial=trial.trial_id, best_score=_num(last.get("best_score")),
                     epoch=last.get("epoch"), stopped_by=self._stopped_by(last))
        self._guard(lambda: self._finish(trial, last))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error_file = str(trial.error_file or "")
        append_event(Path(self.events), "error", trial=trial.trial_id, error=error_file)
        self._guard(lambda: self.tracker.end(self._run(trial), "FAILED", error=_trial_error(trial)))

    def _finish(self, trial, last: dict) -> None:
        from ecgsearch.distributed.raytrain import export_best

        run = self._run(trial)
        epoch = int(last.get("epoch", 0) or 0)
        tags = {"best_score": last.get("best_score"), "best_epoch": last.get("best_epoch"), "last_epoch": epoch}
        if self._stopped_by(last) == "asha":
            tags["stopped_by"] = "asha"
        self.tracker.tags(run, {k: v for k, v in tags.items() if v is not None})
        ckpt = last.get("checkpoint_path")
        if ckpt and Path(ckpt).exists():
            with tempfile.TemporaryDirectory() as tmp:
                export_best(ckpt, Path(tmp) / "model.ckpt")
                # Handed over: the writer may log it minutes later, after this folder is gone.
                self.tracker.log_artifact(run, Path(tmp) / "model.ckpt", "checkpoint", move=True)
        self.tracker.end(run, "FINISHED")

    def _stopped_by(self, last: dict) -> str | None:
        """'asha' (the scheduler ended it), 'early_stopping' (its own patience ran out) or None."""
        epoch = int(last.get("epoch", 0) or 0)
        if epoch >= self.epochs:
            return None
        return "early_stopping" if last.get("should_stop") else "asha"

    def _guard(self, fn) -> None:
        # The tracker only queues, so what can fail here is preparing a call (a config that does
        # not resolve, a checkpoint that does not export). It must not kill a study hours in: it
        # is logged and written to events.jsonl, and the study summary counts it.
        try:
            fn()
        except Exception as exc:
            log.error("MLflow logging failed: %s", exc)
            append_event(Path(self.events), "tracking_error", error=f"{type(exc).__name__}: {exc}")


def _trial_error(trial) -> str:
    """The trial's whole traceback (Tune's error file), else Tune's message."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            return Path(path).read_text()
        except OSError:
            pass
    return str(getattr(trial, "error_msg", None) or "trial raised an error (see the Tune logs)")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


class StudyDisplay:
    """Study events -> the progress display (trials done of N) and one summary line per finished
    trial, with the best so far. Counts each trial once: a resumed driver may see it again."""

    def __init__(self, progress, *, metric: str, mode: str, epochs: int, earlier: Iterable[dict] = ()) -> None:
        self.progress, self.metric, self.mode, self.epochs = progress, metric, mode, epochs
        self.finished: set[str] = set()
        self.best: tuple[str, float] | None = None
        for row in earlier:          # events of an earlier session of this study (--resume)
            self._count(row)

    def _count(self, row: dict) -> bool:
        if row.get("event") not in ("complete", "error") or row.get("trial") in self.finished:
            return False
        self.finished.add(row["trial"])
        score = row.get("best_score") if row["event"] == "complete" else None
        if isinstance(score, (int, float)) and math.isfinite(score):
            if self.best is None or (score > self.best[1] if self.mode == "max" else score < self.best[1]):
                self.best = (row["trial"], float(score))
        return True

    def __call__(self, row: dict) -> None:
        if not self._count(row):
            return
        trial = row["trial"]
        if row["event"] == "error":
            self.progress.note(f"trial {trial} failed: {self._error(row.get('error'))}")
        else:
            how = {"asha": "stopped by ASHA", "early_stopping": "stopped early"}.get(row.get("stopped_by"), "done")
            score = row.get("best_score")
            shown = f"{score:.4f}" if isinstance(score, (int, float)) else "n/a"
            line = f"trial {trial} {how} after {row.get('epoch')}/{self.epochs} epochs: {self.metric}={shown}"
            if self.best is not None:
                line += f" | best so far: trial {self.best[0]} {self.metric}={self.best[1]:.4f}"
            self.progress.note(line)
        self.progress.done()

    @staticmethod
    def _error(error_file: str | None) -> str:
        # The error file holds the trial's whole traceback; one line of it, and where the rest is.
        if not error_file:
            return "unknown error (see ray.log)"
        try:
            return f"{root_cause(Path(error_file).read_text())} (traceback: {error_file})"
        except OSError:
            return f"see {error_file}"

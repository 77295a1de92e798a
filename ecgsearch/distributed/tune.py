"""A hyperparameter study: Ray Tune + Optuna TPE + ASHA, each trial one training (DDP on Ray Train).

Layout of OUT:
    study.json        what the study is (model, task, space, base config): `--resume` checks it
    events.jsonl      trial start/complete/error events, one JSON line each, with the driver pid
    ray/<study>/      Tune's experiment state (what `Tuner.restore` continues from)
    train/<study>/trial-<id>/   each trial's run: its latest epoch checkpoint, resumable
    tracking_backlog.json       only when MLflow missed calls: what they were, in order (--resume replays)
    best.json, best.ckpt        the best trial's resolved TrainConfig + score, and its best weights
    ray.log                     Ray's, Tune's, Optuna's and MLflow's log records (the console shows
                                our progress display and summary lines instead, unless verbose)

Trials are built by `distributed.trials`, the one trial layer a lead search uses too. A one-worker
trial trains in its own process and holds the worker's CPUs/GPUs; a multi-worker trial only
drives a TorchTrainer, so it reserves no CPU (its workers hold them). Either way the trial's run
folder is train/<study>/trial-<id>/, which a retry or a --resumed study continues.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgsearch.distributed.cluster import (ClusterSettings, ensure_ray, max_concurrent_trials, plan_trial_resources,
                                           require_state_api, route_ray_output)
from ecgsearch.distributed.space import (apply_params, check_space_against_model, parse_space, space_for_model,
                                         space_summary)
from ecgsearch.distributed.trials import build_tuner, restore_tuner, trial_plan
from ecgsearch.leads import leads_key
from ecgsearch.progress import Progress
from ecgsearch.tracking import Tracker, preflight, tracking_uri_for

log = logging.getLogger("ecgsearch.tune")

METRIC = "best_score"   # each trial's best validation selection metric so far (what its checkpoint holds)
# What must match between a study and its --resume (anything else may change, e.g. concurrency).
_IDENTITY = ("study", "model", "task", "trials", "epochs", "seed", "space_sha256", "base_config",
             "workers_per_trial", "tracking_uri")


class StudyInterrupted(KeyboardInterrupt):
    """The study stopped before every trial finished (Ctrl-C, SIGTERM, driver shutdown)."""


class StudyFailed(RuntimeError):
    """Every trial failed: the message carries each distinct root cause."""


@dataclass
class TuneSettings:
    data: Path
    model: str
    task: str
    trials: int
    out: Path = Path("tune-out")
    workers_per_trial: int = 1
    gpus_per_trial: float | None = None   # None: one GPU per worker when the cluster has them
    cpus_per_worker: float = 1.0
    max_concurrent: int | None = None     # None: as many as the cluster fits
    epochs: int | None = None             # None: the base config's
    search_space: Path | None = None      # None: the packaged space for the model
    resume: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None         # None: "ecgsearch-<task>" (one experiment per task)
    study_name: str | None = None         # None: "<model>-<task>-<out folder name>"
    seed: int = 0                         # TPE sampler seed
    base_config: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings shared by all trials
    grace_period: int = 1                 # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2
    max_failures: int = 2                 # worker-group restarts per trial, each from its last checkpoint
    register_model: bool = True
    state_save_period_s: float = 1.0      # Tune experiment-state snapshots: what --resume can recover
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    verbose: bool = False                 # Ray's own output (trial tables, worker logs) on the console too

    def validate(self) -> None:
        for name in ("trials", "workers_per_trial", "grace_period"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"invalid setting {name.replace('_', '-')}={v}: must be a whole number >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"invalid setting epochs={self.epochs}: must be >= 1")
        if self.reduction_factor < 2:
            raise ValueError(f"invalid setting reduction-factor={self.reduction_factor}: must be >= 2")
        if not Path(self.data).exists():
            raise FileNotFoundError(f"data cache {self.data} does not exist (make one with `ecgsearch data prepare`)")


class TrialResolver:
    """Sampled trial config -> decoded params and resolved TrainConfig (picklable: shipped to trials)."""

    def __init__(self, space_text: str, space_source: str, base: dict[str, Any]) -> None:
        self.space_text, self.space_source, self.base = space_text, space_source, base
        self._space = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_space": None}

    @property
    def space(self):
        if self._space is None:
            self._space = parse_space(self.space_text, self.space_source)
        return self._space

    def params(self, sampled: dict[str, Any]) -> dict[str, Any]:
        return self.space.decode({k: v for k, v in sampled.items() if k in self.space.params})

    def config(self, sampled: dict[str, Any]):
        from ecgsearch.engine import TrainConfig

        return apply_params(TrainConfig.from_dict(self.base), self.params(sampled))


def _trial(config: dict[str, Any], static: dict[str, Any]) -> None:
    """Tune function: one trial = one training run, named after the trial so a retry resumes it.
    One worker trains here (`fit_in_trial`, the trial's kind is `fit`); more run a TorchTrainer."""
    from ray import tune

    from ecgsearch.distributed.raytrain import RayTrainSettings, fit, fit_in_trial

    trial_id = tune.get_context().get_trial_id()
    cfg = static["resolver"].config(config)
    settings = RayTrainSettings(**static["train"], name=f"trial-{trial_id}")
    if settings.workers == 1:
        fit_in_trial(cfg, static["data"], settings, report=tune.report)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    # The same trial body as a lead search's training units (raytrain.fit); raises on failure.
    fit(cfg, static["data"], settings, callbacks=[TuneReportCallback()])


@dataclass
class StudyResult:
    best: dict[str, Any]          # the content of best.json
    best_json: Path
    best_ckpt: Path
    n_trials: int
    n_errors: int
    tracking_errors: int          # calls that failed to queue, were rejected, or are still unlogged
    parent_run_id: str
    backlog: Path | None = None   # OUT/tracking_backlog.json when something is still unlogged


def _identity(s: TuneSettings, study: str, space, base: dict, uri: str) -> dict[str, Any]:
    # The tracking URI is part of it: the resumed driver logs through callbacks pickled by the first.
    return {"study": study, "model": s.model, "task": s.task, "trials": s.trials, "epochs": base["epochs"],
            "seed": s.seed, "space": space.label, "space_sha256": space.digest, "base_config": base,
            "workers_per_trial": s.workers_per_trial, "tracking_uri": uri}


def _study_uri(s: TuneSettings, out: Path) -> str:
    """The study's store: the setting, else $MLFLOW_TRACKING_URI, else ./mlflow.db; a --resume with
    neither goes on in the store the study began in, from whatever folder it is run."""
    meta = out / "study.json"
    if s.resume and not (s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) and meta.exists():
        saved = json.loads(meta.read_text()).get("tracking_uri")
        if saved:
            return saved
    return tracking_uri_for(s.tracking_uri)


def _check_out(s: TuneSettings, exp_dir: Path, ident: dict) -> bool:
    """True when an existing study is to be continued; errors on a clash."""
    meta = Path(s.out) / "study.json"
    if not exp_dir.exists():
        if s.resume:
            log.warning("--resume given but %s holds no study yet: starting a new one", s.out)
        return False
    if not s.resume:
        raise ValueError(f"output folder {s.out} already holds study {ident['study']!r}; pass --resume "
                         "to continue it, or choose another --out")
    old = json.loads(meta.read_text()) if meta.exists() else {}
    diff = [k for k in _IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(ident[k], sort_keys=True)]
    if diff:
        raise ValueError(f"cannot resume study in {s.out}: its {', '.join(diff)} differ from this command's")
    return True


def run_study(s: TuneSettings) -> StudyResult:
    from ecgsearch.engine import TrainConfig
    from ecgsearch.tasks import get_task

    s.validate()
    task = get_task(s.task)
    base_cfg = TrainConfig.from_dict({**s.base_config, "model": s.model, "task": s.task,
                                      **({"epochs": s.epochs} if s.epochs else {})})
    space = space_for_model(s.model, s.search_space)
    check_space_against_model(space, base_cfg)
    out = Path(s.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study = s.study_name or f"{s.model}-{s.task}-{out.name}"
    base = base_cfg.to_dict()
    uri = _study_uri(s, out)
    ident = _identity(s, study, space, base, uri)
    exp_dir = out / "ray" / study
    resuming = _check_out(s, exp_dir, ident)

    # The display is disabled with --verbose: Ray's lines would break a line redrawn in place.
    with route_ray_output(out / "ray.log", s.verbose), Progress("tune", enabled=not s.verbose) as progress:
        return _run(s, task, study, out, base, space, uri, ident, exp_dir, resuming, progress)


def _run(s, task, study, out, base, space, uri, ident, exp_dir, resuming, progress) -> StudyResult:
    # Fail fast on tracking before any cluster starts or any trial trains.
    preflight(uri)
    # Replays what an earlier session of this study could not log (OUT/tracking_backlog.json).
    tracker = Tracker(uri, s.experiment or f"ecgsearch-{s.task}", out)
    try:
        outcome = _tracked(s, task, study, out, base, space, ident, exp_dir, resuming, progress, tracker)
    finally:
        # Bounded: a dead server costs one probe here, and what it missed goes to the backlog.
        report = tracker.close()
    outcome.tracking_errors += report.problems
    outcome.backlog = report.backlog
    return outcome


def _saved_parent(out: Path) -> str | None:
    meta = out / "study.json"
    saved = json.loads(meta.read_text()).get("mlflow_parent") if meta.exists() else None
    if saved is None:
        log.warning("study.json in %s names no MLflow parent run (an older study): this session logs "
                    "under a new one", out)
    return saved


def _tracked(s, task, study, out, base, space, ident, exp_dir, resuming, progress, tracker) -> StudyResult:
    # A new study always gets a new parent run, even on a shared server that holds an older study
    # of the same name; only --resume of this out folder reopens the one study.json saved.
    parent = tracker.parent(study, tags={"kind": "study", "study": study, "task": s.task, "model": s.model,
                                         "leads": leads_key(base["leads"]), "n_leads": len(base["leads"])},
                            run_id=_saved_parent(out) if resuming else None)
    (out / "study.json").write_text(json.dumps({**ident, "mlflow_parent": parent}, indent=2) + "\n")
    try:
        import ray

        ensure_ray(s.cluster)
        require_state_api()
        res = plan_trial_resources(s.workers_per_trial, s.gpus_per_trial, ray.cluster_resources(),
                                   s.cpus_per_worker)
        concurrent = max_concurrent_trials(res, ray.cluster_resources(), s.max_concurrent, s.trials)
        # Params are what defines the study (a resume must match them); resources are tags, since a
        # resumed study may run on another cluster.
        tracker.log_params(parent, {"model": s.model, "task": s.task, "trials": s.trials, "epochs": base["epochs"],
                                    "search_space": space.label, "seed": s.seed, "workers_per_trial": res.workers,
                                    "metric": task.selection_metric, "mode": task.mode})
        tracker.tags(parent, {"max_concurrent": concurrent, "gpus_per_worker": res.gpus_per_worker,
                              "cpus_per_worker": res.cpus_per_worker})
        tracker.log_dict(parent, space_summary(space), "search_space.json")
        resolver = TrialResolver(space.text, space.source, base)
        epochs = f"{base['epochs']} epoch" + "s" * (base["epochs"] != 1)
        where = ("on the console and in " if s.verbose else "in ") + str(out / "ray.log")
        progress.note(f"study {study}: {s.trials} trials x {epochs} of {s.model} on {s.task}, "
                      f"{concurrent} at a time; Ray's output {where}")
        results = _fit(s, study, out, exp_dir, resuming, space, resolver, res, concurrent, task, tracker.uri,
                       tracker.experiment, parent, progress)
        outcome = _finish(s, out, study, task, results, resolver, tracker, parent)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        _settle_trials(tracker, parent, out, study, status)
        tracker.end(parent, status, error=exc)
        raise
    _settle_trials(tracker, parent, out, study, "KILLED")
    tracker.end(parent, "FINISHED")
    return outcome


def _settle_trials(tracker, parent: str, out: Path, study: str, others: str) -> None:
    """Trial runs end as our ledger says (complete: FINISHED, error: FAILED), whichever session ran
    them: a driver killed before its writer caught up leaves runs RUNNING (or KILLED by the
    resumed driver's cleanup) that Tune will not run again. Runs of other unfinished trials: `others`."""
    from ecgsearch.distributed.study_log import trial_run_name

    ended = {e["trial"]: e["event"] for e in _read_events(out / "events.jsonl") if e["event"] in ("complete", "error")}
    tracker.settle_children(parent, {trial_run_name(study, t): "FINISHED" if ev == "complete" else "FAILED"
                                     for t, ev in ended.items()}, others)


def _fit(s, study, out, exp_dir, resuming, space, resolver, res, concurrent, task, uri, experiment, parent,
         progress):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from ecgsearch.distributed.study_log import StudyCallback, StudyDisplay, listen

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(s.state_save_period_s))
    static = {"resolver": resolver, "data": str(Path(s.data).resolve()),
              "train": {"workers": res.workers, "use_gpu": res.use_gpu, "cpus_per_worker": res.cpus_per_worker,
                        "gpus_per_worker": res.gpus_per_worker or 1.0, "max_failures": s.max_failures,
                        "storage_path": str(out / "train" / study)}}
    plan = trial_plan(res.workers, res.cpus_per_worker, res.gpus_per_worker, s.max_failures)
    epochs = resolver.base["epochs"]
    verbosity = 1 if s.verbose else 0
    if resuming:
        progress.note(f"resuming study {study} from {exp_dir}")
        tuner = restore_tuner(_trial, {"static": static}, kind=plan["kind"], path=str(exp_dir),
                              cpus=plan["cpus"], gpus=plan["gpus"])
        # Tune restores the first session's RunConfig, verbosity included: this session's --verbose
        # decides. (A private attribute: should it go, the study still runs, only as loud as before.)
        internal = getattr(tuner, "_local_tuner", None)
        if internal is not None:
            internal.get_run_config().verbose = verbosity
    else:
        callback = StudyCallback(uri=uri, experiment=experiment, parent_id=parent, study=study,
                                 events=str(out / "events.jsonl"), resolver=resolver, epochs=epochs)
        tuner = build_tuner(
            _trial, {"static": static}, kind=plan["kind"], name=study, storage_path=str(out / "ray"),
            cpus=plan["cpus"], gpus=plan["gpus"], retries=plan["retries"],
            param_space=space.to_tune(), callbacks=[callback], verbose=verbosity,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=task.mode, num_samples=s.trials, max_concurrent_trials=concurrent,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed)),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(s.grace_period, epochs),
                                        reduction_factor=s.reduction_factor)))
    events = out / "events.jsonl"
    display = StudyDisplay(progress, metric=task.selection_metric, mode=task.mode, epochs=epochs,
                           earlier=_read_events(events))
    progress.phase("trials", s.trials, done_before=min(len(display.finished), s.trials))
    with listen(events, display):
        return tuner.fit()


def _finish(s, out, study, task, results, resolver, tracker, parent) -> StudyResult:
    from ecgsearch.distributed.raytrain import export_best
    from ecgsearch.distributed.study_log import root_cause, trial_run_name

    events = _read_events(out / "events.jsonl")
    n_track_err = sum(e["event"] == "tracking_error" for e in events)
    # Tune marks the trials it stops on Ctrl-C as TERMINATED in memory, so count finished trials
    # from our own ledger: only a real completion or a final error writes one of these events.
    done = {e["trial"] for e in events if e["event"] in ("complete", "error")}
    if len(done) < s.trials:
        raise StudyInterrupted(f"study {study} stopped with {len(done)} of {s.trials} trials finished; "
                               "run the same command with --resume to continue")
    sign = 1.0 if task.mode == "max" else -1.0
    ranked = []
    for r in results:
        m = r.metrics or {}
        score, ckpt = m.get(METRIC), m.get("checkpoint_path")
        if isinstance(score, (int, float)) and math.isfinite(score) and ckpt and Path(ckpt).exists():
            ranked.append((sign * float(score), r))
    if not ranked:
        errs = "; ".join(sorted({root_cause(r.error) for r in results if r.error is not None}))
        raise StudyFailed(f"no trial of study {study} produced a finite {task.selection_metric} "
                          f"and a checkpoint{': ' + errs if errs else ''} (Ray's log: {out / 'ray.log'})")
    _, best = max(ranked, key=lambda t: t[0])
    trial_id = best.metrics["trial_id"]
    ck = export_best(best.metrics["checkpoint_path"], out / "best.ckpt")
    # Bounded waits that end at once when the store is down; a live store replaying a long
    # backlog (or a loaded one) gets time to answer, since best.json records these ids.
    run_id = tracker.run_id(trial_run_name(study, trial_id), parent, wait_s=120)
    info = {"config": ck.cfg.to_dict(), "score": float(ck.score), "metric": task.selection_metric,
            "mode": task.mode, "epoch": int(ck.epoch), "val_metrics": ck.val_metrics, "trial_id": trial_id,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolver.params(best.config).items()},
            "sampled": {k: v for k, v in best.config.items() if k in resolver.space.params},  # labels for options
            "study": study, "checkpoint": "best.ckpt", "n_trials": len(results),
            "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment, "parent_run_id": parent,
                       "run_id": run_id}}
    tracker.log_artifact(parent, out / "best.ckpt", "best")
    # The same weights as an MLflow model (signature, leads, rate, length, normaliser): what
    # `mlflow.pyfunc.load_model("models:/<name>@champion")` serves.
    from ecgsearch.tracking.pyfunc import CHAMPION, save_pyfunc

    tracker.log_artifact(parent, save_pyfunc(out / "best.ckpt", out / "model"), "model")
    previous = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else {}
    if previous.get("trial_id") == trial_id and previous.get("mlflow", {}).get("version"):
        # `--resume` of a finished study: same answer, so no second registry version of it.
        info["mlflow"].update({k: previous["mlflow"][k] for k in ("registered_model", "version", "alias", "model_uri")
                               if k in previous["mlflow"]})
    elif s.register_model:
        name = f"ecgsearch-{s.task}-{s.model}"
        version = tracker.register_model(parent, "model", name, tags={"score": info["score"], "study": study,
                                                                      "metric": info["metric"], "trial_id": trial_id},
                                         wait_s=120, alias=CHAMPION)
        if version is None:   # still queued: a --resume (or the replayed backlog) registers it, once
            log.warning("MLflow registry did not answer: %s not registered yet (queued; `--resume` in %s "
                        "finishes it)", name, out)
        info["mlflow"].update(registered_model=name, version=version, alias=CHAMPION,
                              model_uri=f"models:/{name}@{CHAMPION}")
    (out / "best.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    tracker.log_artifact(parent, out / "best.json")
    tracker.log_metrics(parent, {"best_score": info["score"], "best_epoch": info["epoch"]}, 0)
    tracker.tags(parent, {"best_trial": trial_id, "tracking_errors": n_track_err})
    return StudyResult(info, out / "best.json", out / "best.ckpt", len(results), results.num_errors,
                       n_track_err, parent)


def _read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Work units of a lead search and the executors that run them in parallel.

A *unit* is a JSON-able dict naming one piece of work:
- ``train``: train a model on a lead subset with one seed (a retrain candidate, an eval-mode
  step model, the shared masked model, a baseline), then predict the validation and test folds;
- ``predict``: a trained model's validation and test predictions with some leads removed at
  inference (an eval-mode candidate, a lead count or baseline of the shared model).

Every unit writes its predictions to ``preds`` (an .npz of record indices, targets and outputs
for both folds, fp32 inference): the search computes every score, margin and interval from
those arrays in the driver, so statistics never depend on where or how a trial ran.

`run_unit` does the work in the current process. `RayTuneExecutor` runs a batch of units
as parallel Ray Tune trials (one trial per unit; a training trial drives a TorchTrainer of
one or more workers through `distributed.raytrain.fit`, the same body as a study's trials,
so a lost worker resumes from its last epoch checkpoint); `LocalExecutor` runs them one
after another in-process, calling the engine directly, for fast tests.
Both call `on_done(unit, result)` in the driver as soon as each unit finishes, which is
where the search saves its state: that is what makes resume exact.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


UNIT_FILE = "unit.json"   # what a unit folder's Ray Train run trains: resumed only when it matches
RAY_RUN = "train"         # Ray Train run name inside <unit out_dir>/ray: one run per unit, always


def _unit_identity(unit: dict, workers: int) -> dict:
    # What decides the training's numbers; the fault-injection and placement keys do not.
    return {"id": unit["id"], "config": unit["config"], "data": unit["data"], "workers": workers}


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
        log.info("unit %s: resuming its Ray Train run in %s", unit["id"], storage / RAY_RUN)
        return True
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(tmp, marker)
    return False


def _train_on_ray(cfg, unit: dict, out_dir: Path, workers: int) -> dict:
    """One training unit as a W-worker TorchTrainer (W >= 1), launched from inside its Tune trial.

    Epoch checkpoints go to <out_dir>/ray/train, the same folder for the same unit id, so a
    killed worker group restarts from its last epoch (FailureConfig) and an interrupted unit,
    run again (a Tune retry, `--resume`), continues from there instead of from epoch 1.
    """
    from ecgsearch.distributed.raytrain import FAULT_KEYS, RayTrainSettings, export_best, fit
    from ecgsearch.engine import load_checkpoint

    storage = out_dir.resolve() / "ray"
    _reuse_or_reset(unit, out_dir, storage, workers)
    gpus = float(unit.get("gpus_per_worker", 0.0))
    faults = {k: unit[k] for k in FAULT_KEYS if unit.get(k) is not None}
    settings = RayTrainSettings(workers=workers, use_gpu=gpus > 0, gpus_per_worker=gpus or 1.0,
                                cpus_per_worker=float(unit.get("cpus_per_worker", 1.0)),
                                storage_path=str(storage), name=RAY_RUN, **faults)
    try:
        outcome = fit(cfg, unit["data"], settings)
    except Exception as exc:
        raise UnitError(f"unit {unit['id']}: Ray Train run {storage / RAY_RUN} failed "
                        f"(after up to {settings.max_failures} restarts): {type(exc).__name__}: {exc}") from exc
    if outcome.checkpoint_dir is None:
        raise UnitError(f"unit {unit['id']}: the TorchTrainer reported no checkpoint")
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


# ------------------------------------------------------------------------ executors

@dataclass
class LocalExecutor:
    """Runs units one by one in this process (tests, debugging, tiny searches)."""

    name: str = "local"

    def run(self, units: Sequence[dict], on_done: OnDone, label: str = "units") -> None:
        for unit in units:
            try:
                result = run_unit(unit)
            except Exception as exc:
                raise UnitError(f"{label}: unit {unit['id']} failed: {type(exc).__name__}: {exc}",
                                {unit["id"]: f"{type(exc).__name__}: {exc}"}) from exc
            on_done(unit, result)

    def close(self) -> None:
        pass


def _tune_trial(config: dict, units: dict) -> None:
    """Body of one Ray Tune trial: do the units of its pack, report their results once."""
    from ray import tune

    results = {u["id"]: run_unit(u) for u in units[config["unit"]]}
    # Nested dicts would be flattened by Tune's loggers; ship the results as one JSON string.
    tune.report({"result_json": json.dumps(results), "done": True})


def pack_units(units: Sequence[dict]) -> dict[str, list[dict]]:
    """Trials of a batch: a training per trial; predictions grouped by the checkpoint they read.

    An eval-mode step scores N candidates of one model in seconds; N separate trials would
    spend more on Tune's per-trial start-up than on the work, so they share one trial.
    """
    packs: dict[str, list[dict]] = {}
    for u in units:
        key = f"pack:{u['checkpoint']}" if u["kind"] == "predict" else u["id"]
        packs.setdefault(key, []).append(u)
    return packs


@dataclass
class RayTuneExecutor:
    """Runs each batch of units as parallel Ray Tune trials on the current Ray cluster.

    cpus_per_trial: CPUs (and torch threads) of a single-worker trial, or per worker.
    gpus_per_trial: None = one GPU per worker when the cluster has GPUs, else 0.
    workers_per_trial: workers of the TorchTrainer every training trial launches (1 included:
      on Ray each training is a Ray Train run, checkpointed every epoch and restarted from its
      last checkpoint when a worker dies); a training trial reserves 0 CPUs itself (Train V2
      runs the workers as separate actors, and a trial that held a CPU while waiting for them
      deadlocks a small node).
    storage: folder for Tune's experiment records (one sub-folder per batch).
    """

    storage: Path
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    address: str | None = None
    runtime_env: dict = field(default_factory=dict)   # used when this driver joins or starts Ray
    name: str = "ray"

    def __post_init__(self) -> None:
        import ray

        from ecgsearch.distributed.cluster import ClusterSettings, ensure_ray, plan_trial_resources

        # Joins RAY_ADDRESS (e.g. under `ray job submit`) or starts a local Ray whose workers
        # import this working tree.
        ensure_ray(ClusterSettings(address=self.address, runtime_env=self.runtime_env))
        self.plan = plan_trial_resources(self.workers_per_trial, self.gpus_per_trial, ray.cluster_resources(),
                                         cpus_per_worker=self.cpus_per_trial)
        self._batch = 0
        self._stamp = time.strftime("%Y%m%d-%H%M%S")  # batch names stay unique across resumes

    def _resources(self, kind: str) -> dict[str, Any]:
        # A training trial drives its TorchTrainer (0 CPUs); a prediction pack works in the trial.
        gpus = min(1.0, self.plan.gpus_per_worker) if self.plan.use_gpu else 0.0
        return {"kind": "train" if kind == "train" else "work", "cpus": self.cpus_per_trial, "gpus": gpus}

    def _concurrency(self, kind: str, n_trials: int) -> int | None:
        if kind != "train":
            return self.max_concurrent
        import ray

        from ecgsearch.distributed.cluster import max_concurrent_trials

        # 0-CPU trials would all start at once, and their trainers then queue for workers
        # (Train V2 retries a worker group that cannot be placed): start only what fits.
        return max_concurrent_trials(self.plan, ray.cluster_resources(), self.max_concurrent, n_trials)

    def _extra(self, unit: dict, faults: dict[str, dict]) -> dict:
        extra = {"gpus_per_worker": self.plan.gpus_per_worker, "cpus_per_worker": self.plan.cpus_per_worker}
        if unit["kind"] == "train":
            extra["ray_train"] = True
            extra.update(faults.get(unit["id"], {}))
        return extra

    def run(self, units: Sequence[dict], on_done: OnDone, label: str = "units") -> None:
        kinds = list(dict.fromkeys(u["kind"] for u in units))
        if len(kinds) > 1:  # one resource shape per Tune run
            for kind in kinds:
                self.run([u for u in units if u["kind"] == kind], on_done, f"{label} ({kind})")
            return
        self._run(units, on_done, label)

    def _run(self, units: Sequence[dict], on_done: OnDone, label: str) -> None:
        from ray import tune

        if not units:
            return
        from ecgsearch.distributed.raytrain import unit_faults
        from ecgsearch.distributed.trials import build_tuner

        faults = unit_faults()
        by_id = {u["id"]: {**u, **self._extra(u, faults)} for u in units}
        if len(by_id) != len(units):
            raise UnitError(f"{label}: duplicate unit ids in one batch")
        # Trial names: the unit id for a training (a retried trial resumes under it); numbered
        # packs for predictions (their checkpoint paths are too long to be names).
        packs = {(f"predict-seed{v[0]['seed']}-{i:03d}" if k.startswith("pack:") else _safe(k)): v
                 for i, (k, v) in enumerate(pack_units(list(by_id.values())).items())}
        cb = _done_callback(by_id, on_done)
        self._batch += 1
        kind = units[0]["kind"]
        tuner = build_tuner(
            _tune_trial, {"units": packs}, **self._resources(kind),
            name=f"{self._stamp}-{self._batch:03d}-{_safe(label)}", storage_path=str(self.storage),
            param_space={"unit": tune.grid_search(list(packs))}, callbacks=[cb],
            # reuse_actors: a finished trial's worker process takes the next unit, so torch and
            # ecgsearch are imported once per worker rather than once per candidate.
            tune_config=tune.TuneConfig(max_concurrent_trials=self._concurrency(kind, len(packs)),
                                        reuse_actors=True,
                                        trial_name_creator=lambda t: _safe(t.config["unit"]),
                                        trial_dirname_creator=lambda t: _safe(t.config["unit"])))
        grid = tuner.fit()
        errors = {uid: msg for pack, msg in cb.errors.items() for uid in (u["id"] for u in packs[pack])}
        for res in grid:
            if res.error is not None:
                for uid in (u["id"] for u in packs[res.config["unit"]]):
                    errors.setdefault(uid, f"{type(res.error).__name__}: {res.error}")
        unfinished = [uid for uid in by_id if uid not in cb.finished and uid not in errors]
        if unfinished and not errors:
            # Tune stops a run on SIGINT and returns instead of raising: nothing failed, the
            # search was interrupted; the finished units are in the state already.
            raise SearchInterrupted(f"{label}: stopped before {len(unfinished)} trial(s) finished; "
                                    "run again with --resume to continue")
        errors.update({uid: "no result reported" for uid in unfinished})
        if errors:
            detail = "; ".join(f"{uid}: {msg}" for uid, msg in sorted(errors.items()))
            raise UnitError(f"{label}: {len(errors)} of {len(by_id)} trial(s) failed: {detail}", errors)

    def close(self) -> None:
        pass


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


def _done_callback(units: dict, on_done: OnDone):
    """Driver-side Tune hook that hands each finished trial's result to the search at once."""
    from ray import tune

    class DoneCallback(tune.Callback):
        # No closure over the search: cloudpickle would serialise it with the class.
        def __init__(self, units: dict, on_done: OnDone) -> None:
            self.finished: set[str] = set()
            self.errors: dict[str, str] = {}
            self.units, self.on_done = units, on_done

        def __getstate__(self) -> dict:
            # Tune pickles callbacks into its experiment state; the search resumes from its own
            # state.json, so the live hooks (which reach the search context) stay behind.
            return {"finished": self.finished, "errors": self.errors, "units": {}, "on_done": None}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            pack = trial.config["unit"]
            raw = (trial.last_result or {}).get("result_json")
            if raw is None:
                self.errors[pack] = "trial ended without reporting a result"
                return
            for uid, result in json.loads(raw).items():
                self.finished.add(uid)
                self.on_done(self.units[uid], result)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.errors[trial.config["unit"]] = str(getattr(trial, "error_msg", None)
                                                    or "trial raised an error (see the Tune logs)")

    return DoneCallback(units, on_done)

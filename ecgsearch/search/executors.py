"""Executors: how a lead search runs a batch of work units (`search.candidates`).

`RayTuneExecutor` runs each batch as parallel Ray Tune trials, one trial per training unit,
planned as a study's trials are (`distributed.trials.trial_plan`): a one-worker training trains
in its (reused) trial process (`raytrain.fit_in_trial`), a multi-worker one drives a DDP
TorchTrainer (`raytrain.fit`); predictions that read one checkpoint share a trial.
`LocalExecutor` runs the units one after another in-process, calling the engine directly, for
fast tests. Both call `on_done(unit, result)` in the driver as soon as each unit finishes, which
is where the search saves its state: that is what makes resume exact.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgsearch.search.candidates import OnDone, SearchInterrupted, UnitError, run_unit

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
    workers_per_trial: workers of each training. One worker trains in its trial's process,
      which reserves the worker's resources, checkpoints every epoch and is retried by Tune from
      its last checkpoint when it dies (`trials.trial_plan`); with reuse_actors a trial process
      takes unit after unit, so a candidate pays neither a process start nor torch's import.
      More workers run a DDP TorchTrainer from a trial that reserves 0 CPUs (Train V2 runs the
      workers as separate actors, and a trial holding a CPU while it waits for them deadlocks a
      small node).
    max_failures: restarts of a training from its last checkpoint (Ray Train's FailureConfig,
      or Tune's retries of a one-worker trial, plus the node-loss retry either way).
    train_runner: "trial" (the above) or "torchtrainer": every training a Ray Train run, one
      worker included, as before in-trial training existed (bench/rle_parallel.py compares them).
    storage: folder for Tune's experiment records (one sub-folder per batch).
    """

    storage: Path
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    address: str | None = None
    runtime_env: dict = field(default_factory=dict)   # used when this driver joins or starts Ray
    max_failures: int = 2
    train_runner: str = "trial"
    name: str = "ray"

    def __post_init__(self) -> None:
        import ray

        from ecgsearch.distributed.cluster import ClusterSettings, ensure_ray, plan_trial_resources

        if int(self.max_failures) != self.max_failures or self.max_failures < -1:
            raise ValueError(f"invalid setting max_failures={self.max_failures}: -1 (forever) or a whole number >= 0")
        if self.train_runner not in ("trial", "torchtrainer"):
            raise ValueError(f"invalid setting train_runner={self.train_runner!r}: 'trial' or 'torchtrainer'")

        # Joins RAY_ADDRESS (e.g. under `ray job submit`) or starts a local Ray whose workers
        # import this working tree.
        ensure_ray(ClusterSettings(address=self.address, runtime_env=self.runtime_env))
        self.plan = plan_trial_resources(self.workers_per_trial, self.gpus_per_trial, ray.cluster_resources(),
                                         cpus_per_worker=self.cpus_per_trial)
        self._batch = 0
        self._stamp = time.strftime("%Y%m%d-%H%M%S")  # batch names stay unique across resumes

    def _resources(self, kind: str) -> dict[str, Any]:
        # A training trial as a study's (trains itself, or drives a TorchTrainer with 0 CPUs);
        # a prediction pack works in the trial.
        gpus = min(1.0, self.plan.gpus_per_worker) if self.plan.use_gpu else 0.0
        if kind == "train":
            from ecgsearch.distributed.trials import trial_plan

            return trial_plan(self.plan.workers, self.plan.cpus_per_worker, self.plan.gpus_per_worker,
                              self.max_failures, in_trial=self.train_runner == "trial")
        return {"kind": "work", "cpus": self.cpus_per_trial, "gpus": gpus}

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
            if self._resources("train")["kind"] == "fit":
                extra["runner"] = "trial"
            # A unit's max_failures bounds its Ray Train run's restarts; in-trial units have the batch's.
            extra.update({"max_failures": self.max_failures, **faults.get(unit["id"], {})})
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

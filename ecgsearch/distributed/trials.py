"""The one way ecgsearch runs Tune trials: hyperparameter studies and lead searches both build
their `Tuner` here, so trial resources, retries, naming and Tune's storage follow one policy.

A *training* trial only drives a Ray Train `TorchTrainer` (`raytrain.fit`): the trainer's workers
hold the CPUs/GPUs, so the trial itself reserves 0 CPUs (Train V2; a trial holding a CPU while it
waits for its workers deadlocks a small node) and a little memory. A *work* trial (a lead search's
prediction pack) does its work in the trial process and reserves what it uses. A *fit* trial is a
one-worker training done in the trial process (`raytrain.fit_in_trial`): it reserves the worker's
resources, and saves the nested controller and worker processes (`trial_plan` decides).

A training trial lost with its node is retried once (`TRIAL_RETRIES`): the retry calls
`raytrain.fit` with the same run name and storage, which resumes the Ray Train run from its last
committed epoch; worker deaths inside a run are handled below this layer, by Ray Train's own
FailureConfig. A fit trial is its own worker, so Tune retries it up to its restart budget, each
retry resuming from the last epoch it committed.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

TRIAL_MEMORY = 256 * 2**20   # bytes a training trial reserves: it only waits on its trainer
TRIAL_RETRIES = 1            # Tune-level retries of a training trial (each resumes its run)


KINDS = ("train", "fit", "work")


def trial_plan(workers: int, cpus_per_worker: float, gpus_per_worker: float, max_failures: int,
               in_trial: bool = True) -> dict[str, Any]:
    """How a training of `workers` workers runs as a trial: its kind, resources and Tune retries.

    One worker trains in the trial process (`fit`): a nested TorchTrainer would add 7-11 s of
    start-up and two torch processes per trial (bench/ray_overhead.py). More workers need Ray
    Train's worker group and its rendezvous (`train`), as does every training when `in_trial`
    is False (each one a Ray Train run, e.g. to compare the two: bench/rle_parallel.py)."""
    if workers == 1 and in_trial:
        # The worker's restart budget plus the node-loss retry a TorchTrainer trial gets on top (-1: forever).
        retries = -1 if max_failures < 0 else max_failures + TRIAL_RETRIES
        return {"kind": "fit", "cpus": cpus_per_worker, "gpus": gpus_per_worker, "retries": retries}
    return {"kind": "train", "cpus": 0.0, "gpus": 0.0, "retries": TRIAL_RETRIES}


def trial_resources(kind: str, cpus: float = 1.0, gpus: float = 0.0) -> dict[str, float]:
    """Tune resources of one trial: `train` (drives a TorchTrainer) or `fit`/`work` (does it itself)."""
    if kind == "train":
        return {"cpu": 0, "memory": TRIAL_MEMORY}
    if kind not in KINDS:
        raise ValueError(f"unknown trial kind {kind!r}: expected one of {', '.join(map(repr, KINDS))}")
    res = {"cpu": float(cpus)}
    if gpus > 0:
        res["gpu"] = float(gpus)
    return res


def _trainable(fn: Callable[..., None], static: dict[str, Any], kind: str, cpus: float, gpus: float):
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, **static), trial_resources(kind, cpus, gpus))


def build_tuner(fn: Callable[..., None], static: dict[str, Any], *, kind: str, name: str, storage_path: str,
                param_space: dict[str, Any], tune_config: Any, callbacks: Sequence[Any] = (),
                verbose: int = 0, cpus: float = 1.0, gpus: float = 0.0, retries: int | None = None):
    """A `tune.Tuner` running `fn(config, **static)` as trials of `kind`, recorded under
    `storage_path/name` (a deterministic name: the same study or batch resumes under it). Retries:
    a training trial's default is TRIAL_RETRIES, a work trial's 0."""
    if retries is None:
        retries = TRIAL_RETRIES if kind == "train" else 0
    from ray import tune

    return tune.Tuner(
        _trainable(fn, static, kind, cpus, gpus), param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                                  verbose=verbose,
                                  failure_config=tune.FailureConfig(
                                      max_failures=retries)))


def restore_tuner(fn: Callable[..., None], static: dict[str, Any], *, kind: str, path: str,
                  cpus: float = 1.0, gpus: float = 0.0):
    """The Tuner of an interrupted study at `path`, continuing its unfinished and errored trials."""
    from ray import tune

    return tune.Tuner.restore(path, _trainable(fn, static, kind, cpus, gpus), resume_unfinished=True,
                              resume_errored=True)

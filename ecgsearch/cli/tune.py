"""Subcommand: tune (a Ray Tune + Optuna + ASHA study; DDP trials on Ray Train TorchTrainers)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ecgsearch.cli import load_runtime_env, sigterm_as_interrupt


def register(sub) -> None:
    p = sub.add_parser("tune", help="hyperparameter study on Ray (starts a local Ray, or joins RAY_ADDRESS)")
    p.add_argument("--data", required=True, help="prepared cache folder (ecgsearch data prepare)")
    p.add_argument("--model", required=True, help="registered model name, e.g. resnet1d, mlresnet_tiny")
    p.add_argument("--task", required=True, help="rhythm | superclass | age | reconstruct")
    p.add_argument("--trials", type=int, required=True, help="number of trials")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial (default: one per worker when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--search-space", help="search space JSON (default: the packaged one for the model)")
    p.add_argument("--out", default="runs/tune", help="output folder (best.json, best.ckpt, ray/, train/, ...)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out; finished trials are kept")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db: one store per working directory)")
    p.add_argument("--experiment", help="MLflow experiment (default: ecgsearch-<task>)")
    p.add_argument("--study-name", help="study/run name (default: <model>-<task>-<out folder name>)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--config", help="base TrainConfig JSON for every trial (or a best.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base setting, e.g. --set precision=fp32 --set leads=[\"I\",\"II\"]")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--max-failures", type=int, default=2, help="worker restarts per trial, from its checkpoint")
    p.add_argument("--runtime-env", help="Ray runtime_env YAML/JSON used when joining a cluster")
    p.add_argument("--no-register", action="store_true", help="skip the MLflow model registry")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (trial tables, worker logs) on the console; it always goes "
                        "to OUT/ray.log")
    p.set_defaults(func=cmd_tune)


def _base_config(args) -> dict:
    from ecgsearch.engine import TrainConfig, apply_overrides

    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    cfg = apply_overrides(cfg.replace(model=args.model, task=args.task), args.overrides)
    return cfg.to_dict()


def cmd_tune(args: argparse.Namespace) -> int:
    from ecgsearch.cli import CLIError
    from ecgsearch.distributed.cluster import ClusterError, ClusterSettings
    from ecgsearch.tracking import TrackingError
    from ecgsearch.distributed.tune import StudyFailed, StudyInterrupted, TuneSettings, run_study

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = TuneSettings(
        data=Path(args.data), model=args.model, task=args.task, trials=args.trials, out=Path(args.out),
        workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
        cpus_per_worker=args.cpus_per_worker, max_concurrent=args.max_concurrent, epochs=args.epochs,
        search_space=Path(args.search_space) if args.search_space else None, resume=args.resume,
        tracking_uri=args.tracking_uri, experiment=args.experiment, study_name=args.study_name, seed=args.seed,
        base_config=_base_config(args), grace_period=args.grace_period, max_failures=args.max_failures,
        register_model=not args.no_register, verbose=args.verbose,
        cluster=ClusterSettings(runtime_env=load_runtime_env(args.runtime_env)))
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        result = run_study(settings)
    except (TrackingError, ClusterError, StudyFailed) as exc:
        raise CLIError(str(exc)) from None
    except StudyInterrupted as exc:
        print(f"ecgsearch tune: {exc}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    b = result.best
    print(f"best trial {b['trial_id']}: {b['metric']}={b['score']:.4f} at epoch {b['epoch']} "
          f"({result.n_trials} trials, {result.n_errors} failed)")
    if result.tracking_errors:
        where = result.backlog or Path(settings.out) / "events.jsonl"
        print(f"warning: {result.tracking_errors} MLflow call(s) not logged; see {where}"
              + (" (`--resume` replays them)" if result.backlog else ""), file=sys.stderr)
    print(f"wrote {result.best_json} and {result.best_ckpt}")
    return 0

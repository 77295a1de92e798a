"""Ray Train around the engine: `engine.train` runs unchanged inside every `TorchTrainer` worker.

Ray Train initialises torch.distributed (gloo on CPU, NCCL on GPU); the engine then wraps
DDP, shards each epoch like DistributedSampler and checkpoints on rank 0 only. This module
only bridges: each epoch's `EpochReport` becomes a `ray.train.report` (rank 0 attaches the
epoch's resumable checkpoint), and a restarted worker group resumes from
`ray.train.get_checkpoint()`. Data travel as a cache *path*: every worker memory-maps the same
file, so a node's page cache holds one copy however many workers and trials read it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CKPT_FILE = "model.ckpt"


@dataclass
class RayTrainSettings:
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0          # only when use_gpu
    max_failures: int = 2                 # worker-group restarts, each from the last checkpoint
    storage_path: str | None = None       # absolute folder holding run folders (shared storage on clusters)
    name: str = "ecgsearch-train"         # run folder name: the same name resumes the same run
    # Ray Train's controller polls workers every 2 s by default; on short trials that adds seconds of
    # start-up and tear-down per trial, so poll faster (it costs a cheap actor call).
    health_check_interval_s: float = 0.5
    # Fault injection for tests and chaos drills: rank `kill_rank` SIGKILLs itself right after epoch
    # `kill_after_epoch` is reported and committed, once (the marker file records that it happened).
    kill_after_epoch: int | None = None
    kill_marker: str | None = None
    kill_rank: int = 0

    def validate(self) -> None:
        if int(self.workers) != self.workers or self.workers < 1:
            raise ValueError(f"invalid setting workers={self.workers}: must be a whole number >= 1")
        if self.max_failures < -1:
            raise ValueError(f"invalid setting max_failures={self.max_failures}: -1 (forever) or >= 0")
        if self.storage_path is not None and not Path(self.storage_path).is_absolute():
            raise ValueError(f"invalid setting storage_path={self.storage_path!r}: must be absolute")
        if self.kill_after_epoch is not None and not self.kill_marker:
            raise ValueError("kill_after_epoch needs kill_marker (the file that makes the kill happen once)")


# Per-unit RayTrainSettings a lead search's unit may carry: the restart budget and the fault
# injection above (chaos drills, tests), set through FAULTS_ENV for named unit ids only.
FAULT_KEYS = ("max_failures", "kill_after_epoch", "kill_marker", "kill_rank")
FAULTS_ENV = "ECGSEARCH_TRAIN_FAULTS"


def unit_faults(env: dict | None = None) -> dict[str, dict]:
    """{unit id: {FAULT_KEYS...}} from $ECGSEARCH_TRAIN_FAULTS (JSON), read by the driver."""
    raw = (os.environ if env is None else env).get(FAULTS_ENV)
    if not raw:
        return {}
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{FAULTS_ENV}: not JSON ({exc})") from None
    if not isinstance(faults, dict) or not all(isinstance(v, dict) for v in faults.values()):
        raise ValueError(f'{FAULTS_ENV}: expected {{"<unit id>": {{"kill_after_epoch": 1, ...}}}}, got {raw!r}')
    for uid, f in faults.items():
        unknown = sorted(set(f) - set(FAULT_KEYS))
        if unknown:
            raise ValueError(f"{FAULTS_ENV}: unit {uid}: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(FAULT_KEYS)}")
    return faults


def loop_config(cfg, data: str | Path, settings: RayTrainSettings) -> dict[str, Any]:
    """Everything a worker needs, JSON-able (it is shipped to every worker and shown by Ray)."""
    data = Path(data).resolve()
    if not data.exists():
        raise FileNotFoundError(f"data cache {data} does not exist")
    return {"config": cfg.to_dict(), "data": str(data), "kill_after_epoch": settings.kill_after_epoch,
            "kill_marker": settings.kill_marker, "kill_rank": settings.kill_rank}


class _Best:
    """Best score/epoch so far, carried across restarts through the engine's resume state."""

    def __init__(self, score: float = math.nan, epoch: int = 0) -> None:
        self.score, self.epoch = score, epoch

    @classmethod
    def from_resume(cls, ck) -> "_Best":
        return cls(float(ck.extra.get("best_score", math.nan)), int(ck.extra.get("best_epoch", 0)))


def _already_done(cfg, ck) -> bool:
    """A resumed run whose last checkpoint is final: the engine would have nothing to train."""
    return ck.epoch >= cfg.epochs or int(ck.extra.get("bad_epochs", 0)) >= cfg.early_stop_patience


def train_worker(loop: dict[str, Any]) -> None:
    """The function every TorchTrainer worker runs."""
    import ray.train
    import torch

    from ecgsearch.engine import TrainConfig, load_checkpoint, train
    from ecgsearch.engine.runtime import pick_device, resolve_precision

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # The engine picks cuda:LOCAL_RANK; Ray makes the node's trial GPUs visible to each worker.
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    cfg = TrainConfig.from_dict(loop["config"])
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    system = {"device": device.type, "precision": resolve_precision(cfg.precision, device),
              "world_size": world_size}

    restored = ray.train.get_checkpoint()
    opener = restored.as_directory() if restored is not None else contextlib.nullcontext(None)
    with opener as resume_dir:
        resume = Path(resume_dir) / CKPT_FILE if resume_dir else None
        best, first_epoch = _Best(), []
        if resume is not None:
            ck = load_checkpoint(resume)
            best = _Best.from_resume(ck)
            if _already_done(cfg, ck):
                return

        def on_epoch(rep) -> None:
            if not first_epoch:
                first_epoch.append(rep.epoch)
            if rep.is_best:
                best.score, best.epoch = float(rep.metrics["score"]), rep.epoch
            metrics = {**rep.metrics, "epoch": rep.epoch, "best_score": best.score, "best_epoch": best.epoch,
                       "start_epoch": first_epoch[0], "is_best": float(rep.is_best),
                       "should_stop": float(rep.should_stop), **system}
            ckpt = None
            if rank == 0 and rep.checkpoint_dir is not None:
                ckpt = ray.train.Checkpoint.from_directory(str(rep.checkpoint_dir))
            # Every rank reports (it is a barrier); Ray copies rank 0's folder to storage before returning.
            ray.train.report(metrics, checkpoint=ckpt)
            _maybe_kill(loop, rank, rep.epoch)

        train(cfg, loop["data"], resume_from=resume, on_epoch=on_epoch)


def _maybe_kill(loop: dict[str, Any], rank: int, epoch: int) -> None:
    if loop.get("kill_after_epoch") != epoch or rank != loop.get("kill_rank", 0):
        return
    marker = Path(loop["kill_marker"])
    if marker.exists():
        return
    import ray.train

    # Wait until the controller has committed this epoch's checkpoint, so the restart provably
    # resumes from it rather than racing the report.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    marker.write_text(f"killed worker pid {os.getpid()} after epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(cfg, data: str | Path, settings: RayTrainSettings, callbacks=()):
    """A TorchTrainer running `train_worker`; `fit()` it from a driver or a Tune function."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    settings.validate()
    # Ray Train copies these from the process that builds the trainer to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(settings.health_check_interval_s))
    # Ray Train's preemption watcher is one more actor (a process: ~150 MB and a second of start-up
    # on a small node) per run, for observability only: a preempted node's trial is recovered by
    # FailureConfig and the trial retries either way. Off unless the user turns it on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    res = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        res["GPU"] = settings.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config(cfg, data, settings),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=int(settings.workers), use_gpu=settings.use_gpu,
                                               resources_per_worker=res),
        run_config=ray.train.RunConfig(
            name=settings.name, storage_path=settings.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            # Only the latest checkpoint is needed: it resumes the run and carries the best weights.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks)),
    )


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]             # rank 0's last report
    checkpoint_dir: Path | None         # latest committed checkpoint folder (resumable)
    best_score: float
    best_epoch: int
    start_epoch: int                    # > 1 when the last attempt resumed from a checkpoint
    run_path: str


def fit(cfg, data: str | Path, settings: RayTrainSettings, callbacks=()) -> TrainOutcome:
    """Train one config on Ray Train; raises when training failed (after `max_failures` restarts).

    The one trial-running body: a study trial (`tune._trial`, with a TuneReportCallback) and a
    search unit (`candidates._train`) both call this from inside their Tune trial; tests and
    scripts call it from a driver. Ray must be initialised. A `storage_path`/`name` that already
    holds a run resumes it from its latest checkpoint (Train V2 reloads the run's checkpoint
    snapshot), so calling this again after an interruption continues rather than restarts.
    """
    result = make_trainer(cfg, data, settings, callbacks).fit()
    if result.error is not None:
        raise result.error
    m = dict(result.metrics or {})
    ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return TrainOutcome(m, ckpt, float(m.get("best_score", math.nan)), int(m.get("best_epoch", 0)),
                        int(m.get("start_epoch", 1)), str(result.path))


def has_run(storage_path: str | Path, name: str) -> bool:
    """Whether `storage_path/name` holds a Ray Train run that `fit` would resume (a checkpoint was
    committed: Train V2 writes this snapshot with every checkpoint it registers)."""
    try:  # a private constant: should a Ray upgrade move it, fall back to 2.60's file name
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as snapshot
    except ImportError:
        snapshot = "checkpoint_manager_snapshot.json"
    return (Path(storage_path) / name / snapshot).is_file()


def export_best(checkpoint_dir: str | Path, dest: str | Path):
    """Write the best weights held in a resumable epoch checkpoint as a plain model checkpoint.

    The engine keeps the best-so-far weights in every epoch checkpoint, so the latest one is enough:
    no need to keep every epoch's checkpoint just to find the best later.
    """
    from ecgsearch.engine import load_checkpoint, save_checkpoint

    src = Path(checkpoint_dir)
    ck = load_checkpoint(src / CKPT_FILE if src.is_dir() else src)
    if "best_model_state" not in ck.extra:
        raise ValueError(f"checkpoint {src} holds no best-model state; is it an epoch checkpoint?")
    best = dataclasses.replace(ck, epoch=int(ck.extra["best_epoch"]), score=float(ck.extra["best_score"]),
                               val_metrics=ck.extra.get("best_metrics", {}), extra={},
                               # the best epoch's thresholds, as the plain engine's model.ckpt holds
                               thresholds=ck.extra.get("best_thresholds", ck.thresholds))
    save_checkpoint(dest, best, model_state=ck.extra["best_model_state"])
    return best

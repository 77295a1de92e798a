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


class _EpochMetrics:
    """Each epoch's report, the same from a Ray Train worker and from a trial that trains itself:
    the engine's metrics plus the best score so far, the epoch this attempt began at and the system."""

    def __init__(self, best: _Best, system: dict[str, Any]) -> None:
        self.best, self.system, self.first = best, system, None

    def __call__(self, rep) -> dict[str, Any]:
        if self.first is None:
            self.first = rep.epoch
        if rep.is_best:
            self.best.score, self.best.epoch = float(rep.metrics["score"]), rep.epoch
        return {**rep.metrics, "epoch": rep.epoch, "best_score": self.best.score, "best_epoch": self.best.epoch,
                "start_epoch": self.first, "is_best": float(rep.is_best), "should_stop": float(rep.should_stop),
                **self.system}


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
              "world_size": world_size, "runner": "torchtrainer"}

    restored = ray.train.get_checkpoint()
    opener = restored.as_directory() if restored is not None else contextlib.nullcontext(None)
    with opener as resume_dir:
        resume = Path(resume_dir) / CKPT_FILE if resume_dir else None
        best = _Best()
        if resume is not None:
            ck = load_checkpoint(resume)
            best = _Best.from_resume(ck)
            if _already_done(cfg, ck):
                return
        epoch_metrics = _EpochMetrics(best, system)

        def on_epoch(rep) -> None:
            ckpt = None
            if rank == 0 and rep.checkpoint_dir is not None:
                ckpt = ray.train.Checkpoint.from_directory(str(rep.checkpoint_dir))
            # Every rank reports (it is a barrier); Ray copies rank 0's folder to storage before returning.
            ray.train.report(epoch_metrics(rep), checkpoint=ckpt)
            _maybe_kill(loop, rank, rep.epoch, committed=_wait_committed)

        train(cfg, loop["data"], resume_from=resume, on_epoch=on_epoch)


def _wait_committed() -> None:
    import ray.train

    # Wait until the controller has committed this epoch's checkpoint, so the restart provably
    # resumes from it rather than racing the report.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _maybe_kill(loop: dict[str, Any], rank: int, epoch: int, committed=None) -> None:
    if loop.get("kill_after_epoch") != epoch or rank != loop.get("kill_rank", 0):
        return
    marker = Path(loop["kill_marker"])
    if marker.exists():
        return
    if committed is not None:
        committed()
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
    return _outcome(m, ckpt, result.path)


CHECKPOINT_PATH = "checkpoint_path"   # the metric naming a trial's committed checkpoint (Tune's key)
_METRICS_FILE = "metrics.json"


def fit_in_trial(cfg, data: str | Path, settings: RayTrainSettings, report) -> TrainOutcome:
    """Train one config in this process: a one-worker Tune trial that trains itself.

    A one-worker TorchTrainer nests a Train controller and a worker process inside the trial's
    own: about 4 s of start-up and two more torch processes (hundreds of MB) per trial, for
    nothing a single process cannot do. This path keeps `fit`'s contract: the same metrics each
    epoch (`report(metrics)`, with `checkpoint_path`), the same run folder `storage_path/name`
    holding the latest committed epoch checkpoint, and a call with the same name resumes from it.
    A lost process or node is recovered by Tune retrying the trial (`trials.trial_plan`), which
    lands here again. Storage must be shared between nodes, as Ray Train's is.
    """
    from ecgsearch.engine import load_checkpoint, train
    from ecgsearch.engine.runtime import pick_device, resolve_precision

    settings.validate()
    _log_like_a_worker()
    if settings.workers != 1 or settings.storage_path is None:
        raise ValueError(f"fit_in_trial trains one worker into a storage_path (got workers={settings.workers}, "
                         f"storage_path={settings.storage_path!r}); use fit for more")
    loop = loop_config(cfg, data, settings)
    run = Path(settings.storage_path) / settings.name
    run.mkdir(parents=True, exist_ok=True)
    last = _last_checkpoint(run)
    best, resume = _Best(), None
    if last is not None:
        resume = last / CKPT_FILE
        ck = load_checkpoint(resume)
        best = _Best.from_resume(ck)
        if _already_done(cfg, ck):
            # Killed after its last epoch committed: say that epoch again, so Tune ends the trial on it.
            metrics = json.loads((last / _METRICS_FILE).read_text())
            report(metrics)
            return _outcome(metrics, last, run)
    device = pick_device()
    epoch_metrics = _EpochMetrics(best, {"device": device.type, "world_size": 1, "runner": "trial",
                                         "precision": resolve_precision(cfg.precision, device)})
    state = {}

    def on_epoch(rep) -> None:
        metrics = epoch_metrics(rep)
        dest = _commit(run, rep.epoch, rep.checkpoint_dir, metrics)
        state.update(metrics=metrics, dest=dest)
        report(metrics)
        _maybe_kill(loop, 0, rep.epoch)   # after the commit: the retry provably resumes from it

    train(cfg, loop["data"], resume_from=resume, on_epoch=on_epoch)
    return _outcome(state["metrics"], state["dest"], run)


def _log_like_a_worker() -> None:
    """The engine's progress lines on this process's stderr, as a Ray Train worker has them: Ray
    forwards them to the driver (OUT/ray.log for a study, its console with --verbose)."""
    import logging
    import sys

    logger = logging.getLogger("ecgsearch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _commit(run: Path, epoch: int, src: Path, metrics: dict[str, Any]) -> Path:
    """Move the engine's epoch checkpoint into the run folder under a temporary name, then rename:
    a process killed mid-move leaves the previous checkpoint whole. Only the latest is kept.
    Moved, not copied: on one filesystem (a node's scratch and its output) the checkpoint is
    written once; across filesystems (shared storage) `shutil.move` copies it, as Ray Train does.
    The engine writes its next epoch's checkpoint into a fresh folder of the same name."""
    import shutil

    dest = run / f"checkpoint_{epoch:06d}"
    metrics[CHECKPOINT_PATH] = str(dest)
    tmp = run / f".partial_{epoch:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(src), str(tmp))
    (tmp / _METRICS_FILE).write_text(json.dumps(metrics, default=float))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    for old in run.glob("checkpoint_*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _last_checkpoint(run: Path) -> Path | None:
    done = sorted(p for p in run.glob("checkpoint_*") if (p / _METRICS_FILE).is_file())
    return done[-1] if done else None


def _outcome(metrics: dict[str, Any], ckpt: Path | None, run) -> TrainOutcome:
    """A run's outcome from its last epoch's metrics: `fit`'s and `fit_in_trial`'s alike."""
    return TrainOutcome(metrics, ckpt, float(metrics.get("best_score", math.nan)), int(metrics.get("best_epoch", 0)),
                        int(metrics.get("start_epoch", 1)), str(run))


def _snapshot_file() -> str:
    try:  # a private constant: should a Ray upgrade move it, fall back to 2.60's file name
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as snapshot
    except ImportError:
        snapshot = "checkpoint_manager_snapshot.json"
    return snapshot


def run_metrics(storage_path: str | Path, name: str) -> dict[str, Any] | None:
    """The last committed epoch's metrics of the run at `storage_path/name`, whichever runner wrote
    it (`fit_in_trial`'s metrics file, or Train V2's checkpoint snapshot); None when none committed."""
    run = Path(storage_path) / name
    last = _last_checkpoint(run)
    if last is not None:
        return json.loads((last / _METRICS_FILE).read_text())
    snap = run / _snapshot_file()
    if snap.is_file():
        return json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]
    return None


def has_run(storage_path: str | Path, name: str) -> bool:
    """Whether `storage_path/name` holds a run that `fit` or `fit_in_trial` would resume: one that
    committed a checkpoint (Train V2 writes its snapshot with every checkpoint it registers)."""
    run = Path(storage_path) / name
    return (run / _snapshot_file()).is_file() or _last_checkpoint(run) is not None


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

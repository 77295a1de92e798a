"""The training loop: Adam, ReduceLROnPlateau, early stopping, checkpoints every epoch.

One function serves the plain engine, every Ray Train worker and every Tune trial: it
becomes DDP-aware when torch.distributed is initialised and never needs a second copy.

Under DDP, ranks must take every decision in lockstep: the LR step, the best-model choice and
early stopping all hang on the validation score, and a rank that stops (or steps its LR) alone
leaves the others waiting in a collective, a hang Ray's health checks do not see. Scores computed
per rank differ, because each rank's BatchNorm running statistics come from its own shard. So
after each epoch's training rank 0's buffers are broadcast to every rank (weights already agree:
DDP averages the gradients), rank 0 alone scores the validation fold, and its score, metrics,
thresholds and timings are broadcast: every rank then holds the same weights, steps and stops
on the same number, and reports the same metrics. With one process nothing is sent.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ecgsearch.engine import prep as P
from ecgsearch.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ecgsearch.engine.config import TrainConfig
from ecgsearch.engine.loader import Loader, chunked
from ecgsearch.engine.optim import Adam
from ecgsearch.engine.runtime import (autocast, epoch_order, pick_device, resolve_precision, seed_everything,
                                      world)
from ecgsearch.metrics import f1_max_thresholds, flatten_metrics
from ecgsearch.models import create_model

log = logging.getLogger("ecgsearch.engine")

# Settings that may differ between a run and the run it resumes (they do not change the path).
RESUME_MAY_DIFFER = {"epochs", "threads", "bootstrap"}


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    is_best: bool
    # This epoch's resumable checkpoint (rank 0); the callback may move it away: the next epoch writes a new one.
    checkpoint_dir: Path | None
    should_stop: bool


@dataclass
class TrainResult:
    model: torch.nn.Module
    state: Checkpoint
    best_epoch: int
    best_score: float
    val_metrics: dict
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    checkpoint_path: Path | None = None


def open_data(data):
    """Accept an ECGCache or a cache path (each process memory-maps its own view)."""
    if isinstance(data, (str, Path)):
        from ecgsearch.data.cache import load_cache
        return load_cache(data)
    return data


def _plateau_value(task, score: float) -> float:
    # ReduceLROnPlateau cannot compare NaN; an undefined score counts as the worst possible.
    if math.isnan(score):
        return -math.inf if task.mode == "max" else math.inf
    return score


def _check_resume(cfg: TrainConfig, ck: Checkpoint, path) -> None:
    a, b = cfg.to_dict(), ck.cfg.to_dict()
    diff = sorted(k for k in a if k not in RESUME_MAY_DIFFER and a[k] != b.get(k))
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs in {', '.join(diff)}")
    if "optimizer_state" not in ck.extra:
        raise ValueError(f"cannot resume from {path}: it holds no optimizer state (a best-model checkpoint?)")


def train(cfg: TrainConfig, data, out_dir: str | Path | None = None, *, resume_from: str | Path | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None) -> TrainResult:
    data = open_data(data)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rank, world_size = world()
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    prep, train_idx = P.fit(cfg, data)
    val_idx = P.split_indices(data, prep.task, cfg.splits, "val", keep_unlabeled=cfg.keep_unlabeled)
    task = prep.task

    model = create_model(cfg.model, n_leads=len(prep.leads), num_outputs=prep.num_outputs,
                         n_samples=prep.n_samples, **cfg.model_kwargs).to(device)
    # The fused kernel: one pass over all parameters instead of a loop of per-tensor ops (resnet1d on
    # a CPU: 2.9 ms a step against 9.9). torch's Adam, minus its torch._dynamo import (engine.optim).
    opt = Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=task.mode, factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience, min_lr=cfg.min_lr)
    loss_fn = task.make_loss(prep.target_state, **cfg.loss)
    if hasattr(loss_fn, "to"):
        loss_fn = loss_fn.to(device)

    best_state, best_score, best_epoch, bad_epochs, history, start = None, math.nan, 0, 0, [], 1
    best_metrics: dict = {}
    best_thresholds: dict[str, float] | None = None
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        _check_resume(cfg, ck, resume_from)
        model.load_state_dict(ck.model.state_dict())
        opt.load_state_dict(ck.extra["optimizer_state"])
        sched.load_state_dict(ck.extra["scheduler_state"])
        best_state = ck.extra["best_model_state"]
        best_score, best_epoch = float(ck.extra["best_score"]), int(ck.extra["best_epoch"])
        bad_epochs, history = int(ck.extra["bad_epochs"]), list(ck.extra["history"])
        best_metrics = ck.extra.get("best_metrics", {})
        best_thresholds = ck.extra.get("best_thresholds")   # absent in resume files from before thresholds
        start = ck.epoch + 1
        log.info("resumed from %s at epoch %d", resume_from, start)

    net = DistributedDataParallel(model) if world_size > 1 else model
    loader = Loader(prep, data, device, threads=cfg.loader_threads)
    log.info("training %s on %s for %s: device=%s precision=%s workers=%d records train=%d val=%d",
             cfg.model, ",".join(prep.leads), task.name, device, precision, world_size, len(train_idx), len(val_idx))

    out_dir = Path(out_dir) if out_dir is not None else None
    scratch = None
    if rank == 0 and (out_dir is not None or on_epoch is not None):
        ckpt_root = out_dir if out_dir is not None else Path(scratch := tempfile.mkdtemp(prefix="ecgsearch-"))
    else:
        ckpt_root = None

    def snapshot(epoch: int, score: float, metrics: dict, thresholds: dict[str, float] | None,
                 extra: dict | None = None) -> Checkpoint:
        return Checkpoint(model=model, cfg=cfg, leads=prep.leads, fs=prep.fs, n_samples=prep.n_samples,
                          norm=prep.norm, target_norm=prep.target_norm, target_state=prep.target_state,
                          epoch=epoch, score=score, val_metrics=metrics, precision=precision, extra=extra or {},
                          thresholds=thresholds)

    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            # Seeding per epoch makes a resumed run follow the uninterrupted run's path exactly.
            seed_everything(cfg.seed * 100_003 + epoch)
            net.train()
            order = train_idx[epoch_order(len(train_idx), cfg.seed, epoch, rank, world_size)]
            total, count = 0.0, 0
            for b in loader.batches(chunked(order, cfg.batch_size), reuse=True):
                with autocast(device, precision):
                    out = net(b.x)
                loss = loss_fn(out.float(), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * b.n
                count += b.n
            t_train = time.perf_counter() - t0
            train_loss = _mean_across_ranks(total, count, device)
            if world_size > 1:
                _sync_buffers(model)

            def validate() -> tuple:
                # Always fp32, whatever the training precision: bf16 rounding must not decide the
                # best epoch or early stopping, and the scores then match what evaluate() reports
                # for the saved checkpoint.
                y_val, p_val = P.predict(model, prep, data, val_idx, batch_size=max(cfg.batch_size, 128),
                                         device=device, precision="fp32", loader=loader)
                m = task.compute_metrics(y_val, p_val)
                return (float(m[task.selection_metric]), m, _thresholds(task, y_val, p_val),
                        {"train_seconds": t_train, "epoch_seconds": time.perf_counter() - t0})

            # Rank 0 scores, every rank receives: one score per epoch, the same everywhere (module doc).
            score, metrics, thresholds, seconds = _on_rank0(validate, world_size, device)
            sched.step(_plateau_value(task, score))
            is_best = best_state is None or task.better(score, best_score)
            if is_best:
                best_score, best_epoch, bad_epochs, best_metrics = score, epoch, 0, metrics
                best_thresholds = thresholds
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            should_stop = bad_epochs >= cfg.early_stop_patience
            flat = {"epoch": float(epoch), "train_loss": train_loss, "score": score,
                    "lr": float(opt.param_groups[0]["lr"]), **seconds, **flatten_metrics(metrics, "val/")}
            history.append(flat)
            log.info("epoch %d: train_loss=%.4f val %s=%.4f%s", epoch, train_loss, task.selection_metric,
                     score, " *" if is_best else "")
            epoch_dir = None
            if ckpt_root is not None:
                extra = {"optimizer_state": opt.state_dict(), "scheduler_state": sched.state_dict(),
                         "best_model_state": best_state, "best_score": best_score, "best_epoch": best_epoch,
                         "bad_epochs": bad_epochs, "history": history, "best_metrics": best_metrics,
                         "best_thresholds": best_thresholds}
                epoch_dir = ckpt_root / "last"
                save_checkpoint(epoch_dir / "model.ckpt", snapshot(epoch, score, metrics, thresholds, extra))
                if is_best and out_dir is not None:
                    save_checkpoint(out_dir / "model.ckpt", snapshot(epoch, score, metrics, thresholds))
            if on_epoch is not None:
                on_epoch(EpochReport(epoch, flat, is_best, epoch_dir, should_stop))
            if should_stop:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    if best_state is None:
        raise ValueError(f"nothing to train: resumed at epoch {start} but epochs={cfg.epochs}")
    model.load_state_dict(best_state)
    model.eval()
    state = snapshot(best_epoch, best_score, best_metrics, best_thresholds)
    ckpt_path = None
    if out_dir is not None and rank == 0:
        ckpt_path = save_checkpoint(out_dir / "model.ckpt", state)
    return TrainResult(model=model, state=state, best_epoch=best_epoch, best_score=best_score,
                       val_metrics=best_metrics, history=history, start_epoch=start, checkpoint_path=ckpt_path)


def _thresholds(task, y_val, p_val) -> dict[str, float] | None:
    """Multi-label tasks: this epoch's per-class F1-max thresholds on the validation fold."""
    if task.kind != "multilabel":
        return None
    return {c: float(t) for c, t in zip(task.output_names, f1_max_thresholds(y_val, p_val))}


def _sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers on every rank. DDP broadcasts them before each forward, but the last
    forward of an epoch then updates each rank's BatchNorm statistics from its own shard."""
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


def _on_rank0(fn: Callable[[], tuple], world_size: int, device) -> tuple:
    """fn() run on rank 0 only, its result handed to every rank.

    A failure on rank 0 is broadcast too, so the other ranks raise instead of waiting for a
    result that never comes.
    """
    if world_size == 1:
        return fn()
    box: list = [None]
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as exc:  # re-raised below, once the other ranks know
            error, box[0] = exc, (False, f"{type(exc).__name__}: {exc}")
    # NCCL sends objects through this rank's GPU; gloo through the CPU (device=None).
    torch.distributed.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        raise RuntimeError(f"validation failed on rank 0: {value}")
    return value


def _mean_across_ranks(total: float, count: int, device) -> float:
    rank, world_size = world()
    if world_size > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)

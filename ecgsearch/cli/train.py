"""Subcommands: train, evaluate, predict."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ecgsearch.leads import parse_leads


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model on a prepared cache")
    p.add_argument("--data", required=True, help="prepared cache folder (ecgsearch data prepare)")
    p.add_argument("--model", help="registered model name, e.g. resnet1d, mlresnet_tiny")
    p.add_argument("--task", help="rhythm | superclass | age | reconstruct")
    p.add_argument("--leads", help="comma-separated input leads, e.g. I,II,V2 (default: all 12)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", default="runs/train", help="output folder (model.ckpt, metrics.json)")
    p.add_argument("--config", help="JSON TrainConfig, a study's best.json, or a packaged preset name "
                                    "(e.g. ribeiro2020)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set lr=3e-4 --set model_kwargs.dropout=0.3")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last/model.ckpt (and its MLflow run)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db: "
                                          "one store per working directory)")
    p.add_argument("--experiment", help="MLflow experiment (default: ecgsearch-<task>)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a checkpoint on a cache split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--bootstrap", type=int, help="bootstrap resamples for CIs (default: the checkpoint's)")
    e.add_argument("--drop-leads", help="comma-separated leads removed at inference")
    e.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="run a checkpoint on WFDB records (any rate, leads, length)",
                       description="Records, folders (every .hea beneath) and list files (.txt/.lst: one "
                                   "record per line). Leads are matched by name and alias (MLII = II); other "
                                   "channels are ignored and listed. Long records are read as windows of the "
                                   "model's length and averaged; short ones padded and flagged.")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("records", nargs="+", help="WFDB records (with or without .hea), folders, list files")
    r.add_argument("--leads", help="use only these leads of each record, e.g. I,II (ML-ResNet models)")
    r.add_argument("--missing", default="error", choices=("error", "mean"),
                   help="a model that cannot drop leads, on a record lacking some: refuse (default) or "
                        "enter them at their training mean (0 after normalisation), flagged in the output")
    r.add_argument("--stride", type=float, help="seconds between windows on long records (default: the "
                                                "model's window, i.e. consecutive windows)")
    r.add_argument("--per-window", action="store_true", help="also one row per window")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--out", help="write the rows to a .csv or .json file")
    r.add_argument("--skip-bad", action="store_true", help="report bad records by name and predict the rest "
                                                           "(exit code 1 when any failed)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_predict)


def _config(args):
    from ecgsearch.engine import TrainConfig, apply_overrides

    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    direct = {"model": args.model, "task": args.task, "epochs": args.epochs,
              "leads": parse_leads(args.leads) if args.leads else None}
    cfg = cfg.replace(**{k: v for k, v in direct.items() if v is not None})
    return apply_overrides(cfg, args.overrides)


RUN_FILE = "mlflow_run.json"     # OUT's MLflow run, reopened by --resume


def cmd_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = _config(args)
    out = Path(args.out)
    resume = out / "last" / "model.ckpt" if args.resume else None
    if resume is not None and not resume.exists():
        raise FileNotFoundError(f"--resume given but {resume} does not exist")
    from ecgsearch.engine import open_data

    # Opened once, before any MLflow run: a path that is no prepared cache is refused here (the
    # error names it), and training, both evaluations and the operating points share the one map.
    data = open_data(args.data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tracker, run = _track(args, cfg, out)
    try:
        metrics = _train(data, cfg, out, resume, tracker, run)
        tracker.end(run)
    except BaseException as exc:
        tracker.end(run, "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED", error=exc)
        raise
    finally:
        report = tracker.close()
    if report.problems:
        print(f"warning: {report.problems} MLflow call(s) not logged; see {out}", file=sys.stderr)
    _summary(metrics["test"], cfg.task, "test")
    if "operating_points" in metrics:
        _operating_summary(metrics["operating_points"])
    where = f" (MLflow run {run} at {tracker.uri})" if tracker.enabled else ""
    print(f"wrote {out / 'model.ckpt'} and {out / 'metrics.json'}{where}")
    return 0


def _track(args, cfg, out: Path):
    """The MLflow run of this training: a new one, or with --resume the run OUT recorded."""
    from ecgsearch.leads import leads_key
    from ecgsearch.tracking import make_tracker

    tracker = make_tracker(args.tracking_uri, args.experiment or f"ecgsearch-{cfg.task}", out,
                           enabled=not args.no_tracking)
    if not tracker.enabled:
        return tracker, None
    saved = json.loads((out / RUN_FILE).read_text()) if args.resume and (out / RUN_FILE).is_file() else {}
    run_id = saved.get("run_id") if saved.get("tracking_uri") == tracker.uri else None
    leads = leads_key(cfg.leads)
    run = tracker.parent(f"train-{cfg.model}-{cfg.task}-{out.name}", {"cfg": cfg.to_dict(), "data": str(args.data)},
                         {"kind": "train", "task": cfg.task, "model": cfg.model, "leads": leads,
                          "n_leads": len(cfg.leads)}, run_id=run_id)
    (out / RUN_FILE).write_text(json.dumps({"tracking_uri": tracker.uri, "run_id": run}))
    return tracker, run


def _train(data, cfg, out: Path, resume, tracker, run) -> dict:
    """Train, score val and test, write OUT/metrics.json; every epoch and the result to MLflow."""
    from ecgsearch.engine import evaluate, train
    from ecgsearch.engine.evaluate import operating_points
    from ecgsearch.metrics import flatten_metrics

    result = train(cfg, data, out, resume_from=resume,
                   on_epoch=lambda rep: tracker.log_metrics(run, rep.metrics, step=rep.epoch))
    metrics = {"config": cfg.to_dict(), "best_epoch": result.best_epoch, "precision": result.state.precision,
               "val": evaluate(result.state, data, "val"), "test": evaluate(result.state, data, "test")}
    # Thresholds come from the validation fold (stored in the checkpoint); the test fold only scores them.
    ops = operating_points(result.state, data, "test", bootstrap=cfg.bootstrap)
    if ops is not None:
        metrics["operating_points"] = ops
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    tracker.log_metrics(run, {"best_epoch": result.best_epoch, **flatten_metrics(metrics["test"], "test/", strict=False),
                              **flatten_metrics(ops or {}, "test_operating/", strict=False)})
    tracker.log_artifacts(run, [out / "config.json", out / "metrics.json", out / "model.ckpt"])
    return metrics


def _summary(m: dict, task: str, split: str) -> None:
    keys = [k for k in ("macro_auprc", "macro_auroc", "mae", "r2", "mean_r", "mean_rmse") if k in m]
    parts = []
    for k in keys:
        ci = m.get("ci", {}).get(k)
        parts.append(f"{k}={m[k]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    print(f"{task} {split} (n={m.get('n_records')}): " + "  ".join(parts))


def _fmt(value: float, ci) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _operating_summary(m: dict) -> None:
    """Per-class F1 / sensitivity / specificity (95% CI) at the validation-chosen thresholds."""
    ci = m.get("ci", {})
    print(f"operating points on {m['split']} (thresholds from {m['threshold_split']}, n={m['n']}): "
          f"macro_f1={_fmt(m['macro_f1'], ci.get('macro_f1'))}")
    for c, t in m["thresholds"].items():
        cols = "  ".join(f"{short}={_fmt(m[key][c], ci.get(f'{key}/{c}'))}"
                         for key, short in (("f1", "F1"), ("sensitivity", "sens"), ("specificity", "spec")))
        print(f"  {c:<6} t={t:.3f}  {cols}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ecgsearch.engine import evaluate, load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    drop = parse_leads(args.drop_leads) if args.drop_leads else ()
    m = evaluate(ck, args.data, args.split, bootstrap=args.bootstrap, drop_leads=drop)
    if args.json:
        json.dump(m, sys.stdout, indent=2, default=float)
        print()
    else:
        _summary(m, ck.cfg.task, args.split)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ecgsearch.engine.checkpoint import load_checkpoint
    from ecgsearch.engine.records import PredictOptions, RecordPredictor, expand_inputs, write_rows
    from ecgsearch.progress import Progress

    ck = load_checkpoint(args.checkpoint)
    opts = PredictOptions(leads=parse_leads(args.leads) if args.leads else None, missing=args.missing,
                          stride=None if args.stride is None else max(1, round(args.stride * ck.fs)),
                          per_window=args.per_window, batch_size=args.batch_size, skip_bad=args.skip_bad)
    paths = expand_inputs(args.records)
    # A display only where there are many records: one record answers at once.
    with Progress("predict", enabled=len(paths) >= 20) as progress:
        progress.phase("records", len(paths), kind="predict")
        report = RecordPredictor(ck, opts)(paths, on_record=progress.done)
    for record, reason in report.failures:
        print(f"ecgsearch predict: bad record {record}: {reason}", file=sys.stderr)
    if report.failures:
        print(f"ecgsearch predict: {len(report.failures)} of {len(paths)} records failed", file=sys.stderr)
    if report.thresholds is None and report.rows and any(k in report.rows[0] for k in report.output_names):
        if ck.cfg.task not in ("age", "reconstruct"):
            print("ecgsearch predict: the checkpoint carries no thresholds: probabilities only", file=sys.stderr)
    if args.out:
        print(f"wrote {len(report.rows)} rows to {write_rows(report.rows, args.out)}", file=sys.stderr)
    elif args.json:
        json.dump(report.rows, sys.stdout, indent=2)
        print()
    elif report.rows:
        cols = []
        for r in report.rows:
            cols += [c for c in r if c not in cols and c != "record"]
        print("\t".join(["record"] + cols))
        for r in report.rows:
            print("\t".join([r["record"]] + [_cell(r.get(c, "")) for c in cols]))
    return 1 if report.failures else 0


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)



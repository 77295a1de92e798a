"""Subcommands: rle (recursive lead elimination), subsets (exhaustive k-subset search), reconstruct."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from ecgsearch.cli import sigterm_as_interrupt
from ecgsearch.leads import parse_leads

MODELS_HELP = "mlresnet | resnet1d (or mlresnet_tiny, resnet1d_tiny for tests and demos)"


def _search_options(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--data", required=True, help="prepared cache folder (ecgsearch data prepare)")
    p.add_argument("--task", required=True, choices=("rhythm", "superclass", "age"))
    p.add_argument("--model", required=True, help=MODELS_HELP)
    p.add_argument("--mode", default="eval", choices=("eval", "retrain"),
                   help="eval: one model per step, candidates drop a lead at inference; "
                        "retrain: one model per candidate subset")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="JSON TrainConfig or a {\"config\": {...}} wrapper")
    src.add_argument("--from-study", help="tuning study folder; its best.json holds the config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting, e.g. --set lr=3e-4")
    p.add_argument("--epochs", type=int, default=30,
                   help="epoch budget of every training in the search (default 30; a study's own budget is "
                        "ignored); each training stops earlier after --patience epochs without improvement")
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)")
    p.add_argument("--repeats", type=int, default=3,
                   help="seeds per training unit (default 3): scores are means over seeds and every interval "
                        "includes training variance; 1 measures none")
    p.add_argument("--margin", type=float,
                   help="non-inferiority margin on the test fold (default 0.01 macro AUROC; 0.5 years of MAE for age)")
    p.add_argument("--eval-model", choices=("shared", "per-step"),
                   help="eval mode: 'shared' scores every step by masking one subset-lead-dropout model "
                        "(default for mlresnet); 'per-step' retrains a model on each step's leads")
    p.add_argument("--shared-lead-dropout", type=float, default=0.5,
                   help="probability that a batch of the shared model sees a random lead subset (default 0.5)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output on the console (else OUT/ray.log)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="workers per training trial (1: trains in the trial's process; >1: a DDP TorchTrainer per trial)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="restarts of a killed training from its last epoch checkpoint (-1: forever; default 2)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial (default: one per worker when the cluster has GPUs, else 0)")
    p.add_argument("--max-concurrent", type=int, help="cap on parallel trials (default: what fits)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://127.0.0.1:5000 or "
                   "sqlite:////abs/mlflow.db (default: $MLFLOW_TRACKING_URI, else ./mlflow.db: one store per working directory)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    p.add_argument("--experiment", help="MLflow experiment (default: ecgsearch-<task>, beside the studies)")
    p.add_argument("--out", default=out_default, help="output folder (state, models, reports)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out; finished work is kept")
    p.add_argument("--executor", default="ray", choices=("ray", "local"),
                   help="ray: candidates as parallel Ray Tune trials; local: one by one in this process")
    p.add_argument("--runtime-env", help="Ray runtime_env YAML/JSON used when joining a cluster "
                   "(e.g. cluster/runtime_env.yaml: ships this checkout to every node)")


def register(sub) -> None:
    p = sub.add_parser("rle", help="recursive lead elimination down to --min-leads")
    _search_options(p, "runs/rle")
    p.add_argument("--min-leads", type=int, default=3)
    p.add_argument("--start-leads", help="comma-separated start set (default: all 12)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the PhysioNet/CinC 2021 reduced-set baselines")
    p.add_argument("--reconstruct", action="store_true",
                   help="after the search, rebuild 12 leads from the kept set with a U-ResNet")
    p.add_argument("--classifier", help="12-lead classifier for --reconstruct (default: the search's 12-lead model)")
    p.add_argument("--recon-model", default="uresnet", choices=("uresnet", "uresnet_tiny"))
    p.add_argument("--recon-epochs", type=int)
    p.set_defaults(func=cmd_rle)

    s = sub.add_parser("subsets", help="score every k-subset of a lead pool and rank them")
    _search_options(s, "runs/subsets")
    s.add_argument("--k", type=int, required=True, help="subset size (220 subsets for k=3 of 12)")
    s.add_argument("--pool", help="comma-separated lead pool (default: all 12)")
    s.add_argument("--rle", help="an `ecgsearch rle` output folder: report where its k-lead set ranks")
    s.set_defaults(func=cmd_subsets)

    r = sub.add_parser("reconstruct", help="rebuild 12 leads from a subset and score a 12-lead classifier on them")
    r.add_argument("--data", required=True)
    r.add_argument("--leads", required=True, help="kept leads, e.g. I,II,V2")
    r.add_argument("--classifier", required=True, help="checkpoint of a classifier reading all 12 leads")
    r.add_argument("--model", default="uresnet", choices=("uresnet", "uresnet_tiny"))
    r.add_argument("--config", help="JSON TrainConfig for the U-ResNet (task and leads are set here)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--epochs", type=int)
    r.add_argument("--bootstrap", type=int, help="bootstrap resamples for CIs (default: the config's)")
    r.add_argument("--out", default="runs/reconstruct")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    r.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    r.add_argument("--experiment", help="MLflow experiment (default: ecgsearch-<the classifier's task>)")
    r.set_defaults(func=cmd_reconstruct)


def _base_config(args):
    from ecgsearch.engine import TrainConfig, apply_overrides

    if getattr(args, "from_study", None):
        best = Path(args.from_study) / "best.json"
        if not best.exists():
            raise FileNotFoundError(f"--from-study {args.from_study}: no best.json there (has the study finished?)")
        if not isinstance(json.loads(best.read_text()).get("config"), dict):
            raise ValueError(f"--from-study {args.from_study}: best.json has no \"config\" object")
        cfg = TrainConfig.from_file(best)
    elif args.config:
        cfg = TrainConfig.from_file(args.config)
    else:
        cfg = TrainConfig()
    if getattr(args, "epochs", None) is not None and not hasattr(args, "repeats"):
        cfg = cfg.replace(epochs=args.epochs)   # `reconstruct`: its own training length
    return apply_overrides(cfg, args.overrides)


def _settings(args):
    from ecgsearch.cli import load_runtime_env
    from ecgsearch.search.context import SearchSettings

    for pair in args.overrides:   # the budget is the search's own setting, never a silent override
        if pair.split("=", 1)[0] in ("epochs", "early_stop_patience"):
            raise ValueError(f"--set {pair}: a search's epoch budget and patience are set with --epochs and "
                             "--patience")
    start = parse_leads(args.start_leads) if getattr(args, "start_leads", None) else None
    kw = {"start_leads": start} if start else {}
    return SearchSettings(
        data=args.data, task=args.task, model=args.model, out=Path(args.out), mode=args.mode,
        base=_base_config(args), min_leads=getattr(args, "min_leads", 3),
        workers_per_trial=args.workers_per_trial, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, executor=args.executor,
        max_failures=args.max_failures,
        tracking_uri=args.tracking_uri, tracking=not args.no_tracking, experiment=args.experiment,
        baselines=not getattr(args, "no_baselines", False), resume=args.resume, repeats=args.repeats,
        epochs=args.epochs, patience=args.patience, margin=args.margin, eval_model=args.eval_model,
        shared_lead_dropout=args.shared_lead_dropout, verbose=args.verbose,
        runtime_env=load_runtime_env(getattr(args, "runtime_env", None)), **kw)


def _clean_errors(fn, *a, **kw):
    """A failed trial is reported as one line naming the unit (candidate) and the cause."""
    from ecgsearch.cli import CLIError
    from ecgsearch.search.candidates import UnitError

    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        return fn(*a, **kw)
    except UnitError as exc:
        raise CLIError(str(exc)) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_rle(args: argparse.Namespace) -> int:
    from ecgsearch.search.pipeline import run_rle

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recon = None
    if args.reconstruct:
        recon = {"model": args.recon_model, "epochs": args.recon_epochs, "classifier": args.classifier}
    elif args.classifier or args.recon_epochs:
        raise ValueError("--classifier/--recon-epochs need --reconstruct")
    try:
        result = _clean_errors(run_rle, _settings(args), reconstruct=recon)
    except KeyboardInterrupt as exc:
        print(f"ecgsearch rle: interrupted ({exc or 'Ctrl-C'}); finished candidates are saved in "
              f"{args.out}/state.json: run again with --resume", file=sys.stderr)
        return 130
    metric, ni = result["settings"]["metric"], result["settings"]["ni_metric"]
    print(f"elimination order: {' > '.join(result['elimination_order'])}")
    undecided = [st["step"] for st in result["steps"] if not st["decisive"]]
    print(f"kept leads: {','.join(result['kept'])}" + (f" (steps {', '.join(map(str, undecided))} not decisive: "
                                                       "within noise)" if undecided else ""))
    by = {tuple(e["leads"]): e for e in result["noninferiority"] if e["path"]}
    for e in result["by_n_leads"]:
        iv, d = e["intervals"][metric], by[tuple(e["leads"])]
        print(f"  {e['n_leads']:2d} leads {e['leads_key']:<38s} test {metric} {iv['value']:.4f} "
              f"[{iv['ci'][0]:.4f}, {iv['ci'][1]:.4f}]  delta {ni} {d['delta']:+.4f} "
              f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] {d['verdict']}")
    for w in result["warnings"]:
        print(f"WARNING: {w}")
    print(f"wrote {Path(args.out) / 'rle.json'} and {Path(args.out) / 'rle.md'}")
    print(f"answer: {result['answer_line']}")
    return 0


def cmd_subsets(args: argparse.Namespace) -> int:
    from ecgsearch.search.pipeline import run_subsets

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = _clean_errors(run_subsets, _settings(args), args.k, pool=args.pool, rle_dir=args.rle)
    except KeyboardInterrupt as exc:
        print(f"ecgsearch subsets: interrupted ({exc or 'Ctrl-C'}); run again with --resume", file=sys.stderr)
        return 130
    best = result["ranking"][0]
    metric = result["settings"]["metric"]
    print(f"best {args.k}-lead subset: {best['leads_key']} ({metric}={best['score']:.4f}"
          + (f" ± {best['seed_sd']:.4f} over seeds" if best.get("seed_sd") == best.get("seed_sd") and
             best.get("seed_sd") is not None else "") + ")")
    if "rle" in result:
        r = result["rle"]
        print(f"RLE's choice {r['leads_key']}: rank {r['rank']} of {r['of']}, gap to best {r['gap_to_best']:.4f}")
    ok = [row for row in result["ranking"] if row["noninferiority"]["noninferior"]]
    print(f"wrote {Path(args.out) / 'subsets.json'} and {Path(args.out) / 'subsets.md'}")
    ni, margin = result["settings"]["ni_metric"], result["settings"]["margin"]
    if ok:
        d = ok[0]["noninferiority"]
        print(f"answer: {len(ok)} of {len(result['ranking'])} {args.k}-lead subsets are non-inferior to 12 leads at "
              f"margin {margin:g} {ni}; best ranked of them {ok[0]['leads_key']}: delta {d['delta']:+.4f} "
              f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
    else:
        print(f"answer: no {args.k}-lead subset is non-inferior to 12 leads at margin {margin:g} {ni}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from ecgsearch.search.recon_report import reconstruction_markdown
    from ecgsearch.search.reconstruct import ReconstructSettings, reconstruct_tracked

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    rs = ReconstructSettings(data=args.data, leads=parse_leads(args.leads), classifier=args.classifier, out=out,
                             model=args.model, base=_base_config(args), bootstrap=args.bootstrap,
                             tracking=not args.no_tracking, tracking_uri=args.tracking_uri,
                             experiment=args.experiment)
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        result = reconstruct_tracked(rs)
    except KeyboardInterrupt as exc:
        print(f"ecgsearch reconstruct: interrupted ({exc or 'Ctrl-C'})", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(reconstruction_markdown(result))
    print(f"wrote {out / 'reconstruct.json'} and {out / 'reconstruct.md'}")
    if result.get("mlflow", {}).get("run_id"):
        print(f"MLflow run {result['mlflow']['run_id']} at {result['mlflow']['tracking_uri']} "
              f"(the U-ResNet as an MLflow model: {result['mlflow']['model_artifact']})")
    return 0

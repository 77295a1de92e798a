"""The two searches end to end: `run_rle` (greedy elimination) and `run_subsets` (exhaustive)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ecgsearch.leads import CHALLENGE_SUBSETS, LEADS, leads_key, parse_leads
from ecgsearch.metrics import flatten_metrics
from ecgsearch.search import subsets as SS
from ecgsearch.search.context import SearchContext, SearchSettings
from ecgsearch.search.plots import plot_all
from ecgsearch.search.report import clean, write_rle
from ecgsearch.search.rle import Step, elimination_order, eliminate
from ecgsearch.search.state import write_json

log = logging.getLogger("ecgsearch.search")


def _lead_params(leads) -> dict[str, Any]:
    # The MLflow UI filters on these: `params.leads = 'I,II,V2'`, `params.n_leads = '3'`.
    return {"leads": leads_key(leads), "n_leads": len(parse_leads(leads))}


def _lead_tags(leads, kind: str) -> dict[str, str]:
    return {**{k: str(v) for k, v in _lead_params(leads).items()}, "kind": kind}


class _Tracked:
    """Runs a search body inside an MLflow parent run that always ends FINISHED/FAILED/KILLED."""

    def __init__(self, ctx: SearchContext, name: str, params: dict[str, Any]):
        self.ctx, self.name, self.params = ctx, name, params
        self.open: dict[int, str | None] = {}   # child runs still RUNNING (steps in progress)

    def __enter__(self) -> str | None:
        info = self.ctx.state.info
        self.run_id = self.ctx.tracker.parent(self.name, self.params, {"kind": self.params["search"]},
                                              run_id=info.get("mlflow_parent"))
        if self.run_id and info.get("mlflow_parent") != self.run_id:
            self.ctx.state.set_info("mlflow_parent", self.run_id)
        return self.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else (
            "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        for run in self.open.values():
            self.ctx.tracker.end(run, status)
        self.ctx.tracker.end(self.run_id, status)
        self.ctx.close()


def run_rle(s: SearchSettings, reconstruct: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recursive lead elimination from `s.start_leads` to `s.min_leads`; writes OUT/rle.json.

    reconstruct: optional {"model", "epochs", "classifier"} to rebuild 12 leads from the kept set.
    """
    if not 1 <= int(s.min_leads) < len(s.start_leads):   # fail before Ray or MLflow start
        raise ValueError(f"invalid setting min_leads={s.min_leads}: must be between 1 and "
                         f"{len(s.start_leads) - 1} for a start set of {len(s.start_leads)} leads")
    fp = s.fingerprint("rle", start_leads=list(s.start_leads), min_leads=int(s.min_leads),
                       baselines=bool(s.baselines))
    ctx = SearchContext(s, fp)
    tr = ctx.tracker
    name = f"rle-{s.task}-{s.model}-{s.mode}-{len(s.start_leads)}to{s.min_leads}"
    params = {"search": "rle", "task": s.task, "model": s.model, "mode": s.mode, "min_leads": s.min_leads,
              "start_leads": leads_key(s.start_leads), "metric": s.metric, "data": s.data,
              "workers_per_trial": s.workers_per_trial, **{f"cfg.{k}": v for k, v in s.base.to_dict().items()
                                                           if k not in ("leads", "task", "model")}}
    tracked = _Tracked(ctx, name, params)
    with tracked as parent:
        step_runs = tracked.open

        def score_step(index: int, current: tuple[str, ...], subsets: list) -> dict[str, float]:
            n = len(current)
            step_runs[index] = run = tr.child(parent, f"step{index:02d}-n{n}", {**_lead_params(current), "step": index},
                                              _lead_tags(current, "step"), finish=False)

            def log_candidate(unit: dict, result: dict) -> dict:
                removed = [x for x in current if x not in unit["leads"]][0]
                score = result["score"] if unit["kind"] == "drop" else result["val_score"]
                rid = tr.child(run, f"step{index:02d}-without-{removed}",
                               {**_lead_params(unit["leads"]), "removed": removed, "step": index, "mode": s.mode},
                               _lead_tags(unit["leads"], "candidate"), {"score": score, s.metric: score})
                for e, v in enumerate(result.get("val_history", []), 1):
                    tr.log_metrics(rid, {"val_score": v}, step=e)
                return {"mlflow_run_id": rid} if rid else {}

            if s.mode == "eval":
                model = ctx.ensure([ctx.train_unit(current)], f"step {index}: model on {n} leads")[0]
                tr.log_metrics(run, {"model_val_score": model["val_score"]})
                res = ctx.ensure([ctx.drop_unit(current, [lead]) for lead, _ in subsets],
                                 f"step {index}: {n} candidates", log_candidate)
                return {lead: r["score"] for (lead, _), r in zip(subsets, res)}
            res = ctx.ensure([ctx.train_unit(kept) for _, kept in subsets], f"step {index}: {n} candidates",
                             log_candidate)
            return {lead: r["val_score"] for (lead, _), r in zip(subsets, res)}

        def end_step(step: Step) -> None:
            log.info("step %d: removed %s (%s %.4f without it); %d leads left: %s", step.index, step.removed,
                     s.metric, step.score, len(step.kept), leads_key(step.kept))
            run = step_runs.pop(step.index, None)
            tr.log_metrics(run, {"best_score": step.score})
            tr.tag(run, "removed", step.removed)
            tr.end(run)

        steps = eliminate(s.start_leads, s.min_leads, score_step, s.metric_mode, on_step=end_step)
        kept = steps[-1].kept
        count_sets = [st.leads for st in steps] + [kept]
        base_sets = dict(CHALLENGE_SUBSETS) if s.baselines else {}
        all_sets = count_sets + [v for v in base_sets.values() if v not in count_sets]
        ctx.ensure([ctx.train_unit(x) for x in all_sets], "models per lead count and baselines")
        tests = dict(zip(all_sets, ctx.ensure([ctx.test_unit(x) for x in all_sets], "test-fold metrics")))

        def entry(leads) -> dict[str, Any]:
            train = ctx.state.get(f"train:{leads_key(leads)}")
            return {"n_leads": len(leads), "leads": list(leads), "leads_key": leads_key(leads),
                    "val_score": train["val_score"], "seed": train["seed"], "checkpoint": train["checkpoint"],
                    "test": tests[leads]["metrics"]}

        by_n = [entry(x) for x in count_sets]
        baselines = [{"name": nm, **entry(ls)} for nm, ls in base_sets.items()]
        for e in by_n:
            tr.log_metrics(parent, {f"test_{s.metric}": e["test"][s.metric]}, step=e["n_leads"])
        for b in baselines:
            tr.child(parent, f"baseline-{b['name']}", {**_lead_params(b["leads"]), "baseline": b["name"]},
                     _lead_tags(b["leads"], "baseline"),
                     {"val_score": b["val_score"], **flatten_metrics(b["test"], "test/", strict=False)})
        result = {
            "settings": {"search": "rle", "data": s.data, "task": s.task, "model": s.model, "mode": s.mode,
                         "start_leads": list(s.start_leads), "min_leads": s.min_leads, "metric": s.metric,
                         "metric_mode": s.metric_mode, "report_metrics": _report_metrics(s.metric),
                         "workers_per_trial": s.workers_per_trial, "config": s.base.to_dict()},
            "steps": [st.to_dict() for st in steps],
            "elimination_order": elimination_order(steps),
            "kept": list(kept),
            "by_n_leads": by_n,
            "baselines": baselines,
            "mlflow": {"tracking_uri": tr.uri, "parent_run_id": parent},
            # what this process ran (the rest came from the state of an interrupted run)
            "units_run_here": list(ctx.ran),
        }
        if reconstruct is not None:
            rec = result["reconstruction"] = _reconstruct(ctx, kept, reconstruct)
            metric = rec["classifier_metric"]
            tr.log_metrics(parent, {"recon_mean_r": rec["reconstruction"]["mean_r"],
                                    **{f"recon_{k}_{metric}": v[metric] for k, v in rec["classifier_test"].items()}})
        write_rle(s.out, result)
        plots = plot_all(clean(result), s.out)
        tr.log_artifacts(parent, [s.out / "rle.json", s.out / "rle.md", *plots])
        tr.log_metrics(parent, {"n_kept": len(kept)})
    return result


def _report_metrics(metric: str) -> list[str]:
    return [metric, "macro_auroc"] if metric == "macro_auprc" else [metric, "r2"]


def _reconstruct(ctx: SearchContext, kept: tuple[str, ...], opts: dict[str, Any]) -> dict[str, Any]:
    from ecgsearch.search.reconstruct import ReconstructSettings, run_reconstruct

    uid = f"reconstruct:{leads_key(kept)}"
    if ctx.state.done(uid):
        return ctx.state.get(uid)
    classifier = opts.get("classifier")
    if classifier is None:  # the search's own 12-lead model (trained here if not yet)
        ctx.ensure([ctx.train_unit(LEADS)], "12-lead classifier for reconstruction")
        classifier = str(ctx.checkpoint(LEADS))
    rs = ReconstructSettings(data=ctx.s.data, leads=kept, classifier=classifier, out=ctx.out / "reconstruct",
                             model=opts.get("model", "uresnet"), base=ctx.s.base, epochs=opts.get("epochs"))
    res = run_reconstruct(rs)
    ctx.state.record(uid, res)
    return res


def run_subsets(s: SearchSettings, k: int, pool=None, rle_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every k-subset of `pool` (parallel trials), rank them, place RLE's choice."""
    pool = parse_leads(pool) if pool is not None else s.start_leads
    subsets = SS.enumerate_subsets(pool, k)
    if int(k) >= len(pool):
        raise ValueError(f"invalid setting k={k}: must be smaller than the pool ({len(pool)} leads)")
    rle_leads = SS.rle_choice(rle_dir, int(k)) if rle_dir is not None else None
    ctx = SearchContext(dataclasses.replace(s, start_leads=pool),
                        s.fingerprint("subsets", k=int(k), pool=list(pool)))
    tr = ctx.tracker
    name = f"subsets-{s.task}-{s.model}-{s.mode}-k{k}-of{len(pool)}"
    with _Tracked(ctx, name, {"search": "subsets", "task": s.task, "model": s.model, "mode": s.mode,
                              "k": k, "pool": leads_key(pool), "metric": s.metric}) as parent:
        def log_subset(unit: dict, result: dict) -> dict:
            score = result["score"] if unit["kind"] == "drop" else result["val_score"]
            rid = tr.child(parent, f"subset-{leads_key(unit['leads'])}", _lead_params(unit["leads"]),
                           _lead_tags(unit["leads"], "candidate"), {"score": score, s.metric: score})
            return {"mlflow_run_id": rid} if rid else {}

        if s.mode == "eval":
            ctx.ensure([ctx.train_unit(pool)], f"model on the pool {leads_key(pool)}")
            units = [ctx.drop_unit(pool, [x for x in pool if x not in sub]) for sub in subsets]
            res = ctx.ensure(units, f"{len(units)} subsets of {k}", log_subset)
            scores = {leads_key(sub): r["score"] for sub, r in zip(subsets, res)}
        else:
            res = ctx.ensure([ctx.train_unit(sub) for sub in subsets], f"{len(subsets)} subsets of {k}", log_subset)
            scores = {leads_key(sub): r["val_score"] for sub, r in zip(subsets, res)}
        ranking = SS.rank_subsets(scores, s.metric_mode)
        result = {"settings": {"search": "subsets", "data": s.data, "task": s.task, "model": s.model,
                               "mode": s.mode, "k": int(k), "pool": list(pool), "metric": s.metric,
                               "metric_mode": s.metric_mode, "config": s.base.to_dict()},
                  "ranking": ranking, "mlflow": {"tracking_uri": tr.uri, "parent_run_id": parent},
                  "units_run_here": list(ctx.ran)}
        if rle_leads is not None:
            result["rle"] = {"dir": str(rle_dir), **SS.place_subset(ranking, rle_leads, s.metric_mode)}
            tr.log_metrics(parent, {"rle_rank": result["rle"]["rank"], "rle_gap": result["rle"]["gap_to_best"]})
        write_json(s.out / "subsets.json", clean(result))
        (s.out / "subsets.md").write_text(SS.markdown(result))
        tr.log_artifacts(parent, [s.out / "subsets.json", s.out / "subsets.md"])
    return result

"""The two searches end to end: `run_rle` (greedy elimination) and `run_subsets` (exhaustive)."""
from __future__ import annotations

import dataclasses
import math
import logging
from pathlib import Path
from typing import Any

from ecgsearch.leads import CHALLENGE_SUBSETS, LEADS, leads_key, parse_leads
from ecgsearch.metrics import flatten_metrics
from ecgsearch.search import subsets as SS
from ecgsearch.search.context import SearchContext, SearchSettings
from ecgsearch.search.candidates import UnitError
from ecgsearch.search.evidence import Evidence, answer, answer_line
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
        self.run_id = self.ctx.tracker.parent(self.name, self.params,
                                              {"kind": "search", "search": self.name, "task": self.params["task"],
                                               "model": self.params["model"],
                                               **_lead_params(self.ctx.s.start_leads)},
                                              run_id=info.get("mlflow_parent"))
        if self.run_id and info.get("mlflow_parent") != self.run_id:
            self.ctx.state.set_info("mlflow_parent", self.run_id)
        return self.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else (
            "KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
        for run in self.open.values():
            self.ctx.tracker.end(run, status, error=exc)
        self.ctx.tracker.end(self.run_id, status, error=exc)
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
    tr, ev, seeds = ctx.tracker, Evidence(ctx), s.seeds
    n_steps = len(s.start_leads) - int(s.min_leads)
    name = f"rle-{s.task}-{s.model}-{s.mode}-{len(s.start_leads)}to{s.min_leads}"
    params = {"search": "rle", "task": s.task, "model": s.model, "mode": s.mode, "min_leads": s.min_leads,
              "start_leads": leads_key(s.start_leads), "metric": s.metric, "data": s.data,
              "repeats": s.repeats, "margin": s.margin, "ni_metric": s.ni_metric,
              "eval_model": s.eval_model if s.mode == "eval" else "", "workers_per_trial": s.workers_per_trial,
              **{f"cfg.{k}": v for k, v in s.base.to_dict().items() if k not in ("leads", "task", "model", "seed")}}
    tracked = _Tracked(ctx, name, params)

    def set_units(leads) -> list[dict]:
        """One unit per seed whose predictions are 'the model for this lead set'."""
        if s.shared:
            return [ctx.predict_unit(s.start_leads, seed, leads) for seed in seeds]
        return [ctx.train_unit(leads, seed) for seed in seeds]

    with tracked as parent:
        step_runs, step_extra, cand_units = tracked.open, {}, {}
        if s.shared:
            ctx.ensure([ctx.train_unit(s.start_leads, seed) for seed in seeds],
                       "shared-model trainings",
                       remaining=0)

        def score_step(index: int, current: tuple[str, ...], subsets: list) -> dict[str, float]:
            n = len(current)
            step_runs[index] = run = tr.child(parent, f"step{index:02d}-n{n}", {**_lead_params(current), "step": index},
                                              _lead_tags(current, "step"), finish=False)
            if s.mode == "eval" and not s.shared:
                ctx.ensure([ctx.train_unit(current, seed) for seed in seeds], "step-model trainings",
                           step=index, n_steps=n_steps, remaining=_rle_units(s, index, "train"))
            model_leads = s.start_leads if s.shared else current
            units = {lead: ([ctx.predict_unit(model_leads, seed, kept) for seed in seeds] if s.mode == "eval"
                            else [ctx.train_unit(kept, seed) for seed in seeds]) for lead, kept in subsets}
            try:
                ctx.ensure([u for us in units.values() for u in us], f"candidate units ({n} x {len(seeds)} seeds)",
                           step=index, n_steps=n_steps,
                           remaining=_rle_units(s, index, "predict" if s.mode == "eval" else "train"))
            except UnitError as exc:   # each failed candidate becomes a FAILED run with its error
                for lead, kept in subsets:
                    errs = [exc.failed[u["id"]] for u in units[lead] if u["id"] in exc.failed]
                    if errs:
                        rid = tr.child(run, f"step{index:02d}-without-{lead}",
                                       {**_lead_params(kept), "removed": lead, "step": index, "mode": s.mode},
                                       _lead_tags(kept, "candidate"), finish=False)
                        tr.end(rid, "FAILED", error="; ".join(errs))
                raise
            cand_units[index] = units
            info = {lead: ev.scores(us) for lead, us in units.items()}
            step_extra[index] = {"candidates": info}
            for lead, kept in subsets:
                sc = info[lead]
                tr.child(run, f"step{index:02d}-without-{lead}",
                         {**_lead_params(kept), "removed": lead, "step": index, "mode": s.mode, "repeats": s.repeats},
                         _lead_tags(kept, "candidate"),
                         {"score": sc["score"], s.metric: sc["score"], "score_seed_sd": sc["seed_sd"],
                          **{f"score_seed{sd}": v for sd, v in zip(seeds, sc["seed_scores"])}})
            return {lead: sc["score"] for lead, sc in info.items()}

        def end_step(step: Step) -> None:
            sign = 1.0 if s.metric_mode == "max" else -1.0
            others = sorted((c for c in step.candidates if c.removed != step.removed), key=lambda c: -sign * c.score)
            extra = step_extra[step.index]
            if others:
                runner = others[0].removed
                extra.update(runner_up=runner, **ev.margin_of(cand_units[step.index][step.removed],
                                                             cand_units[step.index][runner]))
            else:
                extra.update(runner_up=None, margin=None, margin_ci=None, margin_ci_records=None, decisive=True)
            noise = "" if extra["decisive"] else "  (not decisive: within noise)"
            ctx.note(f"step {step.index}/{n_steps}: removed {step.removed} ({s.metric} {step.score:.4f} without it; "
                     f"margin over {extra['runner_up']} {_num(extra['margin'])} CI {_ci(extra['margin_ci'])})"
                     f"{noise}; {len(step.kept)} leads left: {leads_key(step.kept)}")
            run = step_runs.pop(step.index, None)
            tr.log_metrics(run, {"best_score": step.score, "margin": extra["margin"],
                                 "decisive": float(extra["decisive"])})
            tr.tag(run, "removed", step.removed)
            tr.end(run)

        steps = eliminate(s.start_leads, s.min_leads, score_step, s.metric_mode, on_step=end_step)
        kept = steps[-1].kept
        count_sets = [st.leads for st in steps] + [kept]
        base_sets = dict(CHALLENGE_SUBSETS) if s.baselines else {}
        skipped = {}
        if s.shared:   # the shared model reads only subsets of its start set
            skipped = {nm: ls for nm, ls in base_sets.items() if not set(ls) <= set(s.start_leads)}
            base_sets = {nm: ls for nm, ls in base_sets.items() if nm not in skipped}
        ref_units = (set_units(LEADS) if s.shared and set(s.start_leads) == set(LEADS)
                     else [ctx.train_unit(LEADS, seed) for seed in seeds])
        all_sets = list(dict.fromkeys(count_sets + list(base_sets.values())))
        ctx.ensure([u for x in all_sets for u in set_units(x)] + ref_units, "lead-count and baseline units")
        sets = {leads_key(x): ev.lead_set(x, set_units(x)) for x in all_sets}
        reference = ev.lead_set(LEADS, ref_units)
        by_n = [sets[leads_key(x)] for x in count_sets]
        baselines = [{"name": nm, **sets[leads_key(ls)]} for nm, ls in base_sets.items()]
        noninf = [{"leads": e["leads"], "n_leads": e["n_leads"], "path": True, **ev.versus(set_units(e["leads"]), ref_units)}
                  for e in by_n]
        noninf += [{"leads": b["leads"], "n_leads": b["n_leads"], "path": False, "baseline": b["name"],
                    **ev.versus(set_units(b["leads"]), ref_units)} for b in baselines]
        ans = answer(noninf, s.ni_metric, s.margin)
        steps_json = _steps_json(steps, step_extra, seeds)
        warnings = _warnings(ev, reference, list(sets.values()), steps_json, s)
        warnings += _repeats_advice(noninf, ans, s.repeats)
        for e in by_n:
            tr.log_metrics(parent, {f"test_{s.metric}": e["test"][s.metric],
                                    f"test_{s.ni_metric}": e["intervals"][s.ni_metric]["value"]}, step=e["n_leads"])
        for b in baselines:
            tr.child(parent, f"baseline-{b['name']}", {**_lead_params(b["leads"]), "baseline": b["name"]},
                     _lead_tags(b["leads"], "baseline"),
                     {"val_score": b["val"]["score"], **flatten_metrics(b["test"], "test/", strict=False)})
        result = {
            "settings": {"search": "rle", "data": s.data, "task": s.task, "model": s.model, "mode": s.mode,
                         "eval_model": s.eval_model if s.mode == "eval" else None,
                         "shared_lead_dropout": s.shared_lead_dropout if s.shared else None,
                         "start_leads": list(s.start_leads), "min_leads": s.min_leads, "metric": s.metric,
                         "metric_mode": s.metric_mode, "report_metrics": _report_metrics(s.metric),
                         "repeats": s.repeats, "seeds": seeds, "margin": s.margin, "ni_metric": s.ni_metric,
                         "epochs": s.epochs, "patience": s.patience, "bootstrap": ev.n_boot,
                         "workers_per_trial": s.workers_per_trial, "config": s.base.to_dict()},
            "answer": ans,
            "answer_line": answer_line(ans, len(LEADS), s.repeats),
            "warnings": warnings,
            "steps": steps_json,
            "elimination_order": elimination_order(steps),
            "kept": list(kept),
            "reference": reference,
            "by_n_leads": by_n,
            "baselines": baselines,
            "baselines_skipped": {nm: list(ls) for nm, ls in skipped.items()},
            "noninferiority": noninf,
            "mlflow": {"tracking_uri": tr.uri, "parent_run_id": parent},
            # what this process ran (the rest came from the state of an interrupted run)
            "units_run_here": list(ctx.ran),
        }
        if reconstruct is not None:
            from ecgsearch.search.reconstruct import log_reconstruction

            rec = result["reconstruction"] = _reconstruct(ctx, kept, reconstruct)
            result["mlflow"]["reconstruction"] = log_reconstruction(tr, parent, rec, s.out / "reconstruct")
        if tr.enabled:
            from ecgsearch.search.models import log_lead_count_models

            result["mlflow"].update(log_lead_count_models(ctx, parent, by_n, set_units, ans,
                                                          f"ecgsearch-{s.task}-{s.model}-leads"))
        write_rle(s.out, result)
        write_json(s.out / "noninferiority.json", clean({"answer": ans, "noninferiority": noninf}))
        plots = plot_all(clean(result), s.out)
        tr.log_artifacts(parent, [s.out / "rle.json", s.out / "rle.md", s.out / "noninferiority.json", *plots])
        tr.log_params(parent, {"answer.leads": leads_key(ans["leads"]) if ans["leads"] else "none",
                               "answer.n_leads": ans["n_leads"] if ans["leads"] else 0})
        tr.log_metrics(parent, {"n_kept": len(kept), "answer_n_leads": ans["n_leads"] or 0,
                                **({"answer_delta": ans["delta"], "answer_ci_lo": ans["ci"][0],
                                    "answer_ci_hi": ans["ci"][1]} if ans["leads"] else {})})
    return result


def _rle_units(s: SearchSettings, after_step: int, kind: str) -> int:
    """Units of `kind` still to come after step `after_step` (for the time-left estimate)."""
    n, r = len(s.start_leads), s.repeats
    later = [n - k for k in range(after_step + 1, n - s.min_leads + 1)]   # candidates of each later step
    if kind == "train":
        return r * (sum(later) if s.mode == "retrain" else (0 if s.shared else len(later)))
    return r * sum(later) if s.mode == "eval" else 0


def _steps_json(steps: list[Step], extra: dict, seeds: list[int]) -> list[dict]:
    out = []
    for st in steps:
        d, x = st.to_dict(), extra[st.index]
        for c in d["candidates"]:
            info = x["candidates"][c["removed"]]
            c.update(seed_scores=info["seed_scores"], seed_sd=info["seed_sd"])
        d.update({k: v for k, v in x.items() if k != "candidates"})
        d["seeds"] = seeds
        out.append(d)
    return out


def _warnings(ev: Evidence, reference: dict, sets: list[dict], steps: list[dict], s: SearchSettings) -> list[str]:
    """What a reader must not miss, in words."""
    out = []
    chance = ev.near_chance(reference)
    if chance:
        out.append(chance)
    runs = {r["unit"]: r for e in [reference, *sets] for r in e["training"]["runs"]}
    still = sorted(u for u, r in runs.items() if r["still_improving"])
    if still:
        out.append(f"{len(still)} of {len(runs)} trainings were still improving when the {s.epochs}-epoch budget "
                   f"ran out (best epoch = last epoch): {', '.join(still[:6])}{' ...' if len(still) > 6 else ''}; "
                   "their scores understate what the lead sets can do: raise --epochs")
    undecided = [st for st in steps if not st["decisive"]]
    if undecided:
        out.append(f"{len(undecided)} of {len(steps)} elimination steps were not decisive (the winner's margin over "
                   "the runner-up has a 95% CI that includes 0): the order of those removals is within noise")
    if s.repeats < 2:
        out.append("repeats=1: training variance was not measured, so every interval covers test sampling only "
                   "and understates the uncertainty; use --repeats 3 or more")
    return out


def _repeats_advice(noninf: list[dict], ans: dict, repeats: int) -> list[str]:
    """Say when training variance, not test sampling, dominates the answer's interval.

    The delta's training SE with R seeds is sd_seed / sqrt(R); its test-sampling SE is read
    off the records-only CI (half-width / 1.96). When the first is larger, more seeds would
    narrow the interval more than a larger test fold would.
    """
    path = [e for e in noninf if e.get("path") and e["n_leads"] < max(x["n_leads"] for x in noninf)]
    if repeats < 2 or not path:
        return []
    e = next((x for x in path if ans.get("leads") and x["leads"] == ans["leads"]), min(path, key=lambda x: x["n_leads"]))
    sd, (lo, hi) = e.get("delta_seed_sd"), e.get("ci_records") or (None, None)
    if sd is None or lo is None or not math.isfinite(sd) or not hi > lo:
        return []
    se_train, se_test = sd / math.sqrt(repeats), (hi - lo) / (2 * 1.96)
    if se_train <= se_test:
        return []
    need = math.ceil((sd / se_test) ** 2)
    return [f"training variance dominates the {e['n_leads']}-lead delta: between-seed SD {sd:.4f}, so its training "
            f"SE with {repeats} seeds is {se_train:.4f} against a test-sampling SE of {se_test:.4f}; about "
            f"--repeats {need} would bring it under test sampling"]


def _num(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _report_metrics(metric: str) -> list[str]:
    return [metric, "macro_auroc"] if metric == "macro_auprc" else [metric, "r2"]


def _reconstruct(ctx: SearchContext, kept: tuple[str, ...], opts: dict[str, Any]) -> dict[str, Any]:
    from ecgsearch.search.reconstruct import ReconstructSettings, run_reconstruct

    uid = f"reconstruct:{leads_key(kept)}"
    if ctx.state.done(uid):
        return ctx.state.get(uid)
    classifier = opts.get("classifier")
    if classifier is None:  # the search's own 12-lead model (trained here if not yet)
        seed = ctx.s.seeds[0]
        ctx.ensure([ctx.train_unit(LEADS, seed)], "12-lead classifier for reconstruction")
        classifier = str(ctx.checkpoint(LEADS, seed))
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
    tr, ev, seeds = ctx.tracker, Evidence(ctx), s.seeds
    name = f"subsets-{s.task}-{s.model}-{s.mode}-k{k}-of{len(pool)}"
    with _Tracked(ctx, name, {"search": "subsets", "task": s.task, "model": s.model, "mode": s.mode,
                              "k": k, "pool": leads_key(pool), "metric": s.metric, "repeats": s.repeats,
                              "margin": s.margin, "ni_metric": s.ni_metric}) as parent:
        if s.mode == "eval":   # one model on the pool (per seed), every subset read from it
            ctx.ensure([ctx.train_unit(pool, seed) for seed in seeds], "pool-model trainings")
            units = {leads_key(sub): [ctx.predict_unit(pool, seed, sub) for seed in seeds] for sub in subsets}
            ref_units = ([ctx.train_unit(pool, seed) for seed in seeds] if set(pool) == set(LEADS)
                         else [ctx.train_unit(LEADS, seed) for seed in seeds])
        else:
            units = {leads_key(sub): [ctx.train_unit(sub, seed) for seed in seeds] for sub in subsets}
            ref_units = [ctx.train_unit(LEADS, seed) for seed in seeds]
        ctx.ensure([u for us in units.values() for u in us] + ref_units, f"subset units ({len(subsets)} x {len(seeds)} seeds)")
        scores = {key: ev.scores(us) for key, us in units.items()}
        ranking = SS.rank_subsets({key: sc["score"] for key, sc in scores.items()}, s.metric_mode)
        for row in ranking:
            row.update(seed_scores=scores[row["leads_key"]]["seed_scores"], seed_sd=scores[row["leads_key"]]["seed_sd"])
            row["noninferiority"] = ev.versus(units[row["leads_key"]], ref_units)
            tr.child(parent, f"subset-{row['leads_key']}", _lead_params(row["leads"]), _lead_tags(row["leads"], "subset"),
                     {"score": row["score"], s.metric: row["score"], "score_seed_sd": row["seed_sd"],
                      "rank": row["rank"], f"delta_{s.ni_metric}": row["noninferiority"]["delta"],
                      "delta_ci_lo": row["noninferiority"]["ci"][0], "delta_ci_hi": row["noninferiority"]["ci"][1],
                      "noninferior": float(row["noninferiority"]["noninferior"])})
        result = {"settings": {"search": "subsets", "data": s.data, "task": s.task, "model": s.model,
                               "mode": s.mode, "k": int(k), "pool": list(pool), "metric": s.metric,
                               "metric_mode": s.metric_mode, "repeats": s.repeats, "seeds": seeds,
                               "margin": s.margin, "ni_metric": s.ni_metric, "epochs": s.epochs,
                               "config": s.base.to_dict()},
                  "ranking": ranking, "reference": ev.lead_set(LEADS, ref_units),
                  "mlflow": {"tracking_uri": tr.uri, "parent_run_id": parent},
                  "units_run_here": list(ctx.ran)}
        if rle_leads is not None:
            result["rle"] = {"dir": str(rle_dir), **SS.place_subset(ranking, rle_leads, s.metric_mode)}
            tr.log_metrics(parent, {"rle_rank": result["rle"]["rank"], "rle_gap": result["rle"]["gap_to_best"]})
        if tr.enabled:   # the best-ranked subset's model; registered @champion when non-inferior
            from ecgsearch.search.models import log_lead_count_models

            ok = [r for r in ranking if r["noninferiority"]["noninferior"]]
            pick = (ok or ranking)[0]
            ans = {"leads": pick["leads"], "n_leads": int(k)} if ok else {}
            result["mlflow"].update(log_lead_count_models(
                ctx, parent, [{"leads": pick["leads"], "n_leads": int(k)}], lambda x: units[leads_key(x)], ans,
                f"ecgsearch-{s.task}-{s.model}-k{k}-leads"))
        write_json(s.out / "subsets.json", clean(result))
        (s.out / "subsets.md").write_text(SS.markdown(result))
        tr.log_artifacts(parent, [s.out / "subsets.json", s.out / "subsets.md"])
    return result

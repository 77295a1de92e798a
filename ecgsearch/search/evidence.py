"""From saved predictions to the search's evidence: scores, step margins, non-inferiority, answer.

Every unit of a search leaves its validation and test predictions on disk (one file per
training seed), so each figure here is computed from arrays, in one place, the same way for
RLE steps, lead counts, baselines and exhaustive subsets:

- a candidate's validation **score** is the mean over its R seeds of the selection metric;
- a step's **margin** is the winner's score minus the runner-up's, with a paired two-level
  bootstrap CI on the validation fold (`ecgsearch.stats`); a CI that includes 0 marks the step
  not decisive: the data cannot tell those two removals apart;
- a lead set's **test figures** come from the seed ensemble (mean of the R models' outputs),
  with intervals that resample seeds as well as records, plus each seed's own value;
- **non-inferiority**: delta = metric(set) - metric(12 leads) on the test fold, paired, with a
  verdict at the margin; the **answer** is the smallest set on the path that is non-inferior.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecgsearch import stats
from ecgsearch.leads import leads_key, parse_leads
from ecgsearch.tasks import get_task

# A 12-lead reference this close to chance makes every comparison with it meaningless.
CHANCE = {"macro_auroc": (0.5, 0.6), "r2": (0.0, 0.1)}   # (chance level, "near chance" below this)


class Evidence:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        s = ctx.s
        self.task = get_task(s.task)
        self.metric, self.mode = s.metric, s.metric_mode
        self.ni_metric, self.margin = s.ni_metric, float(s.margin)
        self.ni_mode = stats.MODES[self.ni_metric]
        self.n_boot = max(int(s.base.bootstrap), 1)
        self.seed = int(s.base.seed)
        self.classification = self.task.kind == "multilabel"

    # -- validation ---------------------------------------------------------------------
    def scores(self, units: Sequence[dict]) -> dict[str, Any]:
        """Mean validation score over the seeds, each seed's score and their SD."""
        _, y, p = self.ctx.predictions(units, "val")
        fn = stats.stat_for(self.metric)
        per = [float(fn(y[None], p[r][None])[0]) for r in range(p.shape[0])]
        sd = float(np.std(per, ddof=1)) if len(per) > 1 else math.nan
        return {"score": float(np.mean(per)), "seed_scores": per, "seed_sd": sd}

    def margin_of(self, winner: Sequence[dict], runner: Sequence[dict]) -> dict[str, Any]:
        """Winner minus runner-up on the validation fold, oriented so that > 0 favours the winner."""
        _, y, pw = self.ctx.predictions(winner, "val")
        _, _, pr = self.ctx.predictions(runner, "val")
        iv = stats.paired_interval(self.metric, y, pw, pr, combine="mean", n_boot=self.n_boot, seed=self.seed)
        value, ci = stats.oriented(iv, self.mode)
        _, ci_rec = stats.oriented(stats.Interval(iv.value, iv.ci_records, iv.ci_records, [], math.nan,
                                                  iv.n_seeds, iv.n_records, iv.n_boot, iv.combine), self.mode)
        return {"margin": value, "margin_ci": list(ci), "margin_ci_records": list(ci_rec),
                "decisive": stats.decisive(ci)}

    # -- test -----------------------------------------------------------------------------
    def lead_set(self, leads: Sequence[str], units: Sequence[dict]) -> dict[str, Any]:
        """Test figures of one lead set: ensemble metrics, two-level intervals, per-seed values."""
        _, y, p = self.ctx.predictions(units, "test")
        ens = p.mean(axis=0)
        y_nat = y if self.classification else y[:, 0]
        test = self.task.compute_metrics(y_nat, ens if self.classification else ens[:, :1],
                                         bootstrap=self.n_boot, seed=self.seed)
        names = [self.metric, self.ni_metric] + (["r2"] if not self.classification else [])
        intervals = {m: stats.paired_interval(m, y, p, combine="ensemble", n_boot=self.n_boot,
                                              seed=self.seed).to_dict() for m in dict.fromkeys(names)}
        out = {"leads": list(parse_leads(leads)), "leads_key": leads_key(leads), "n_leads": len(leads),
               "seeds": [int(u["seed"]) for u in units], "test": test, "intervals": intervals,
               "val": self.scores(units), "training": self.training(units)}
        if self.classification:
            out["operating_points"] = self.operating_points(units, y, ens)
        return out

    def operating_points(self, units: Sequence[dict], y_test: np.ndarray, p_test: np.ndarray) -> dict:
        """Per-class thresholds chosen on the validation fold (F1-max), applied to the test fold."""
        from ecgsearch.metrics import f1_max_thresholds, operating_point_metrics

        _, y_val, p_val = self.ctx.predictions(units, "val")
        thr = f1_max_thresholds(y_val, p_val.mean(axis=0))
        return operating_point_metrics(y_test, p_test, thr, list(self.task.output_names),
                                       bootstrap=self.n_boot, seed=self.seed)

    def training(self, units: Sequence[dict]) -> dict[str, Any]:
        """Convergence facts of the trainings behind these predictions (the models, not the masks)."""
        runs = []
        for u in units:
            tid = u["id"] if u["kind"] == "train" else f"train:{leads_key(u['model_leads'])}@{u['seed']}"
            r = self.ctx.state.get(tid)
            runs.append({"unit": tid, "best_epoch": r.get("best_epoch"), "epochs_run": r.get("epochs_run"),
                         "budget": r.get("budget"), "still_improving": bool(r.get("still_improving"))})
        return {"runs": runs, "still_improving": sum(r["still_improving"] for r in runs)}

    def versus(self, units: Sequence[dict], reference: Sequence[dict]) -> dict[str, Any]:
        """Non-inferiority of a set against the reference (12 leads) on the test fold."""
        _, y, p = self.ctx.predictions(units, "test")
        _, _, q = self.ctx.predictions(reference, "test")
        iv = stats.paired_interval(self.ni_metric, y, p, q, combine="ensemble", n_boot=self.n_boot, seed=self.seed)
        return {"metric": self.ni_metric, **stats.noninferiority(iv, self.margin, self.ni_mode)}

    def near_chance(self, entry: dict[str, Any]) -> str | None:
        """A sentence when the reference's test figure is near chance, else None."""
        name = "macro_auroc" if self.classification else "r2"
        chance, floor = CHANCE[name]
        iv = entry["intervals"][name]
        lo = iv["ci"][0]
        if iv["value"] < floor or (math.isfinite(lo) and lo <= chance):
            return (f"the {entry['n_leads']}-lead reference scores test {name} {iv['value']:.3f} "
                    f"[{iv['ci'][0]:.3f}, {iv['ci'][1]:.3f}], near chance ({chance:g}): it has not learned the "
                    "task, so 'as good as 12 leads' means nothing here; train longer, tune, or use more data")
        return None


def answer(noninf: Sequence[dict[str, Any]], metric: str, margin: float) -> dict[str, Any]:
    """The smallest set on the path that is non-inferior to the reference (None when none is)."""
    ok = [e for e in noninf if e.get("path") and e["noninferior"]]
    if not ok:
        return {"leads": None, "n_leads": None, "metric": metric, "margin": margin, "delta": None, "ci": None}
    best = min(ok, key=lambda e: e["n_leads"])
    return {"leads": best["leads"], "n_leads": best["n_leads"], "metric": metric, "margin": margin,
            "delta": best["delta"], "ci": best["ci"], "training_variance": best["training_variance"]}


def answer_line(ans: dict[str, Any], ref_n: int, repeats: int) -> str:
    """The one sentence a user takes away (the CLI's last line, rle.md's opening line)."""
    what = "seeds and records resampled" if repeats > 1 else "records resampled; training variance NOT measured (repeats=1)"
    if ans["leads"] is None:
        return (f"no lead set on the elimination path is non-inferior to {ref_n} leads at margin "
                f"{ans['margin']:g} {ans['metric']} (test fold, 95% CI, {what})")
    lo, hi = ans["ci"]
    return (f"{','.join(ans['leads'])} ({ans['n_leads']} leads) is non-inferior to {ref_n} leads: "
            f"delta {ans['metric']} {ans['delta']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], margin {ans['margin']:g} "
            f"(test fold, {what})")

"""The search's evidence layer on hand-made predictions: step margins, answer, warnings."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ecgsearch import stats
from ecgsearch.search.evidence import Evidence, answer, answer_line


class FakeContext:
    """Predictions keyed by unit id, as SearchContext.predictions serves them from OUT/preds."""

    def __init__(self, preds: dict[str, np.ndarray], y: np.ndarray, task: str = "superclass"):
        metric = "mae" if task == "age" else "macro_auprc"
        self.s = SimpleNamespace(task=task, metric=metric, metric_mode="min" if task == "age" else "max",
                                 ni_metric="mae" if task == "age" else "macro_auroc", margin=0.01,
                                 base=SimpleNamespace(bootstrap=300, seed=0))
        self.preds, self.y = preds, y

    def predictions(self, units, split):
        return np.arange(len(self.y)), self.y, np.stack([self.preds[u["id"]] for u in units])


def _units(name, seeds=(0, 1)):
    return [{"id": f"{name}@{s}", "kind": "predict", "seed": s, "model_leads": ["I"]} for s in seeds]


def test_two_candidates_with_identical_predictions_make_a_step_that_is_not_decisive():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 5)) < 0.3).astype(float)
    p = [y + rng.standard_normal(y.shape) for _ in range(2)]
    ctx = FakeContext({"a@0": p[0], "a@1": p[1], "b@0": p[0], "b@1": p[1],
                       "c@0": 4 * y + p[0], "c@1": 4 * y + p[1]}, y)
    ev = Evidence(ctx)
    same = ev.margin_of(_units("a"), _units("b"))
    assert same["margin"] == 0.0 and same["margin_ci"] == [0.0, 0.0] and not same["decisive"]
    clear = ev.margin_of(_units("c"), _units("a"))
    assert clear["margin"] > 0 and clear["margin_ci"][0] > 0 and clear["decisive"]
    sc = ev.scores(_units("c"))
    assert sc["score"] == pytest.approx(np.mean(sc["seed_scores"])) and len(sc["seed_scores"]) == 2


def test_age_margins_are_oriented_so_lower_error_wins():
    rng = np.random.default_rng(1)
    ages = rng.uniform(20, 90, (300, 1))
    good = [ages + rng.normal(0, 3, ages.shape) for _ in range(2)]
    bad = [ages + rng.normal(0, 12, ages.shape) for _ in range(2)]
    ctx = FakeContext({"g@0": good[0], "g@1": good[1], "b@0": bad[0], "b@1": bad[1]}, ages, task="age")
    m = Evidence(ctx).margin_of(_units("g"), _units("b"))
    assert m["margin"] > 0 and m["decisive"]   # the winner (lower MAE) is ahead by a positive margin


def test_answer_is_the_smallest_noninferior_set_on_the_path():
    rows = [{"leads": ["I", "II", "V2", "V5"], "n_leads": 4, "path": True, "noninferior": True, "delta": 0.0,
             "ci": [-0.005, 0.004], "training_variance": True},
            {"leads": ["I", "V2", "V5"], "n_leads": 3, "path": True, "noninferior": True, "delta": -0.002,
             "ci": [-0.008, 0.003], "training_variance": True},
            {"leads": ["V2", "V5"], "n_leads": 2, "path": True, "noninferior": False, "delta": -0.03,
             "ci": [-0.05, -0.01], "training_variance": True},
            {"leads": ["I", "II"], "n_leads": 2, "path": False, "noninferior": True, "delta": 0.0,
             "ci": [-0.001, 0.001], "training_variance": True}]
    ans = answer(rows, "macro_auroc", 0.01)
    assert ans["leads"] == ["I", "V2", "V5"] and ans["n_leads"] == 3   # a baseline is never the answer
    line = answer_line(ans, 12, 3)
    assert line.startswith("I,V2,V5 (3 leads) is non-inferior to 12 leads: delta macro_auroc -0.0020")
    none = answer([r for r in rows if r["n_leads"] == 2], "macro_auroc", 0.01)
    assert none["leads"] is None
    assert answer_line(none, 12, 1).startswith("no lead set on the elimination path is non-inferior")
    assert "training variance NOT measured" in answer_line(none, 12, 1)


def test_a_reference_near_chance_is_flagged():
    rng = np.random.default_rng(2)
    y = (rng.random((150, 5)) < 0.3).astype(float)
    noise = [rng.standard_normal(y.shape) for _ in range(2)]
    ctx = FakeContext({"r@0": noise[0], "r@1": noise[1], "s@0": 3 * y + noise[0], "s@1": 3 * y + noise[1]}, y)
    ev = Evidence(ctx)

    def ivs(name):
        arms = np.stack([ctx.preds[f"{name}@0"], ctx.preds[f"{name}@1"]])
        return {"macro_auroc": stats.paired_interval("macro_auroc", y, arms).to_dict()}

    assert "near chance" in ev.near_chance({"n_leads": 12, "intervals": ivs("r")})
    assert ev.near_chance({"n_leads": 12, "intervals": ivs("s")}) is None

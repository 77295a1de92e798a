"""RLE algorithm, resume state, subset ranking, report and plots: pure parts, no training."""
from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import pytest

from ecgsearch.leads import CHALLENGE_SUBSETS, LEADS, leads_key
from ecgsearch.search import subsets as SS
from ecgsearch.search.plots import plot_all
from ecgsearch.search.report import clean, write_rle
from ecgsearch.search.rle import candidate_subsets, choose_removal, Candidate, eliminate
from ecgsearch.search.state import SearchState

# A planted ground truth: each lead adds its weight to the score of any subset holding it.
WEIGHTS = {lead: w for lead, w in zip(LEADS, (5, 9, 1, 2, 7, 3, 4, 11, 6, 8, 10, 0.5))}


def additive_scorer(calls: list | None = None, mode: str = "max"):
    sign = 1 if mode == "max" else -1

    def score(index, current, subsets):
        if calls is not None:
            calls.append((index, current))
        return {removed: sign * sum(WEIGHTS[x] for x in kept) for removed, kept in subsets}
    return score


def test_candidates_are_the_n_leave_one_out_subsets_in_canonical_order():
    subs = candidate_subsets(["V2", "I", "AVL"])
    assert subs == [("I", ("AVL", "V2")), ("AVL", ("I", "V2")), ("V2", ("I", "AVL"))]
    assert len(candidate_subsets(LEADS)) == 12 and all(len(k) == 11 for _, k in candidate_subsets(LEADS))


@pytest.mark.parametrize("mode", ["max", "min"])
def test_elimination_removes_least_useful_lead_each_step(mode):
    calls: list = []
    steps = eliminate(LEADS, 3, additive_scorer(calls, mode), mode=mode)
    # lowest weights first: V6 0.5, III 1, AVR 2, AVF 3, V1 4, I 5, V3 6, AVL 7, V4 8
    assert [s.removed for s in steps] == ["V6", "III", "AVR", "AVF", "V1", "I", "V3", "AVL", "V4"]
    assert steps[-1].kept == ("II", "V2", "V5")
    assert [len(s.leads) for s in steps] == list(range(12, 3, -1))
    assert [c for c in calls] == [(s.index, s.leads) for s in steps]
    # each step records every candidate's score, and the winner is the best of them
    for s in steps:
        assert [c.removed for c in s.candidates] == list(s.leads)
        best = max(c.score for c in s.candidates) if mode == "max" else min(c.score for c in s.candidates)
        assert s.score == best


def test_ties_break_by_removing_the_lead_last_in_canonical_order():
    flat = lambda i, cur, subs: {r: 0.5 for r, _ in subs}  # noqa: E731
    steps = eliminate(("I", "II", "V2", "V6"), 1, flat)
    assert [s.removed for s in steps] == ["V6", "V2", "II"] and steps[-1].kept == ("I",)
    assert steps[0].tied == ["I", "II", "V2"]
    # differences below the tolerance are ties too; a real difference wins regardless of order
    c = [Candidate("I", ("II",), 0.8), Candidate("II", ("I",), 0.8 + 1e-12), Candidate("V1", ("I",), 0.79)]
    assert choose_removal(c)[0].removed == "II"
    c[0] = Candidate("I", ("II",), 0.81)
    assert choose_removal(c)[0].removed == "I"


def test_bad_scores_and_settings_are_errors_naming_the_step_and_lead():
    with pytest.raises(ValueError, match="min_leads=12"):
        eliminate(LEADS, 12, additive_scorer())
    with pytest.raises(ValueError, match="min_leads=0"):
        eliminate(("I", "II"), 0, additive_scorer())
    with pytest.raises(ValueError, match=r"step 1 .*no score for the candidate without V2"):
        eliminate(("I", "II", "V2"), 2, lambda i, c, s: {"I": 1.0, "II": 2.0})
    with pytest.raises(ValueError, match=r"candidate without II \(I,V2\) scored nan"):
        eliminate(("I", "II", "V2"), 2, lambda i, c, s: {"I": 1.0, "II": math.nan, "V2": 0.0})
    with pytest.raises(ValueError, match="unknown lead 'V9'"):
        eliminate(("I", "V9"), 1, additive_scorer())


def test_state_resumes_only_matching_settings_and_survives_reload(tmp_path):
    fp = {"kind": "rle", "task": "rhythm", "config": {"lr": 0.001}}
    st = SearchState.open(tmp_path, fp, resume=False)
    st.record("train:I,II", {"val_score": 0.5, "checkpoint": "models/I-II/model.ckpt"})
    with pytest.raises(ValueError, match="already holds a search; pass --resume"):
        SearchState.open(tmp_path, fp, resume=False)
    again = SearchState.open(tmp_path, fp, resume=True)
    assert again.done("train:I,II") and again.get("train:I,II")["val_score"] == 0.5
    with pytest.raises(ValueError, match=r"settings differ .*\(config.lr: saved 0.001, now 0.01\)"):
        SearchState.open(tmp_path, {**fp, "config": {"lr": 0.01}}, resume=True)
    with pytest.raises(FileNotFoundError, match="no search state"):
        SearchState.open(tmp_path / "other", fp, resume=True)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files


def test_subsets_enumerate_rank_and_place_rle_choice(tmp_path):
    subs = SS.enumerate_subsets(LEADS, 3)
    assert len(subs) == 220 and len(set(subs)) == 220 and subs[0] == ("I", "II", "III")
    assert len(SS.enumerate_subsets(("I", "II", "V1", "V2", "V5"), 2)) == 10
    with pytest.raises(ValueError, match="k=13"):
        SS.enumerate_subsets(LEADS, 13)
    scores = {leads_key(s): sum(WEIGHTS[x] for x in s) for s in subs}
    ranking = SS.rank_subsets(scores, "max")
    assert ranking[0]["leads_key"] == "II,V2,V5" and ranking[0]["rank"] == 1
    assert [r["score"] for r in ranking] == sorted(scores.values(), reverse=True)
    # ties share a rank: I,V2,V3 and II,V2,III... pick two subsets with equal weight sums
    tied = [r for r in ranking if r["score"] == 20]
    assert len(tied) > 1 and len({r["rank"] for r in tied}) == 1
    placed = SS.place_subset(ranking, ("V5", "II", "V4"))   # 9 + 10 + 8 = 27 vs best 30
    assert placed["rank"] == 1 + sum(1 for v in scores.values() if v > 27) and placed["gap_to_best"] == 3
    with pytest.raises(ValueError, match="not among the 220 ranked subsets"):
        SS.place_subset(ranking, ("I", "II"))
    low = SS.rank_subsets({"I": 0.3, "II": 0.1, "V1": 0.2}, "min")
    assert [r["leads_key"] for r in low] == ["II", "V1", "I"]
    # the RLE's k-lead set is read back from its rle.json path
    steps = eliminate(LEADS, 3, additive_scorer())
    (tmp_path / "rle.json").write_text(json.dumps({"steps": [s.to_dict() for s in steps],
                                                   "kept": list(steps[-1].kept)}))
    assert SS.rle_choice(tmp_path, 3) == ("II", "V2", "V5")
    assert SS.rle_choice(tmp_path, 5) == ("II", "AVL", "V2", "V4", "V5")
    with pytest.raises(ValueError, match="has no 2-lead set"):
        SS.rle_choice(tmp_path, 2)


def _fake_result():
    steps = eliminate(LEADS, 3, additive_scorer())
    counts = [s.leads for s in steps] + [steps[-1].kept]

    def test(v):
        return {"macro_auprc": v, "macro_auroc": v + 0.1, "ci": {"macro_auprc": [v - 0.05, v + 0.05],
                                                                 "macro_auroc": [v, v + 0.2]}}
    def step(st):
        d = st.to_dict()
        decisive = st.index % 2 == 0   # odd steps within noise
        d.update(margin=0.02 if decisive else 0.001, margin_ci=[0.01, 0.03] if decisive else [-0.01, 0.012],
                 decisive=decisive, runner_up=st.candidates[0].removed)
        return d

    def ni(c, v, verdict):
        return {"leads": list(c), "n_leads": len(c), "path": True, "delta": v, "ci": [v - 0.01, v + 0.01],
                "ci_records": [v - 0.005, v + 0.005], "noninferior": verdict == "non-inferior", "verdict": verdict}

    return {"settings": {"search": "rle", "data": "/d", "task": "rhythm", "model": "mlresnet_tiny",
                         "mode": "eval", "eval_model": "shared", "start_leads": list(LEADS), "min_leads": 3,
                         "metric": "macro_auprc", "metric_mode": "max", "ni_metric": "macro_auroc", "margin": 0.01,
                         "repeats": 3, "seeds": [0, 1, 2], "epochs": 30, "patience": 6,
                         "report_metrics": ["macro_auprc", "macro_auroc"]},
            "answer_line": "II,V2,V5,V4 (4 leads) is non-inferior to 12 leads: ...",
            "answer": {"leads": ["II", "V2", "V4", "V5"], "n_leads": 4},
            "warnings": ["5 of 9 elimination steps were not decisive"],
            "noninferiority": [ni(c, 0.0 if len(c) > 3 else -0.05, "non-inferior" if len(c) > 3 else "inferior")
                               for c in counts],
            "steps": [step(s) for s in steps], "elimination_order": [s.removed for s in steps],
            "kept": list(steps[-1].kept),
            "by_n_leads": [{"n_leads": len(c), "leads": list(c), "leads_key": leads_key(c),
                            "test": test(0.3 + 0.05 * len(c))} for c in counts],
            "baselines": [{"name": n, "n_leads": len(ls), "leads": list(ls), "leads_key": leads_key(ls),
                           "test": test(0.5 if n != "2-lead" else math.nan)} for n, ls in CHALLENGE_SUBSETS.items()]}


def test_report_json_markdown_and_plots(tmp_path):
    result = _fake_result()
    jp, mp = write_rle(tmp_path, result)
    data = json.loads(jp.read_text())            # strict JSON: NaN became null
    assert data["baselines"][-1]["test"]["macro_auprc"] is None
    assert data["kept"] == ["II", "V2", "V5"] and len(data["steps"]) == 9
    assert len(data["steps"][0]["candidates"]) == 12
    md = mp.read_text()
    assert "kept leads: II,V2,V5" in md
    assert md.splitlines()[2] == "**Answer: II,V2,V5,V4 (4 leads) is non-inferior to 12 leads: ....**"
    assert "> **Warning:** 5 of 9 elimination steps were not decisive" in md
    assert "| II,V2,V5 | 3 | -0.0500 [-0.0600, -0.0400] | [-0.0550, -0.0450] | inferior |" in md
    assert md.count("**no: within noise**") == 5 and "| +0.0200 [+0.0100, +0.0300] | yes |" in md
    assert "| 1 | 12 | V6 |" in md                 # step 1 removes V6
    assert "0.9000 [0.8500, 0.9500]" in md          # the 12-lead test metric with its CI
    assert "2-lead: I,II | 2 | n/a" in md
    pngs = plot_all(clean(result), tmp_path)
    for p in pngs:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05            # something was drawn, not a blank canvas


def test_cli_rejects_bad_settings_before_any_training(tmp_path, capsys):
    from ecgsearch.cli import main

    def args(**over):
        opts = {"--data": str(tmp_path), "--task": "rhythm", "--model": "mlresnet_tiny", "--executor": "local",
                "--out": str(tmp_path / "out"), **over}
        flat = ["rle", "--no-tracking"]
        for k, v in opts.items():
            flat += [k] if v is True else [k, v]
        return flat

    cases = [
        ({"--min-leads": "12"}, "min_leads=12: must be between 1 and 11"),
        ({"--start-leads": "I,II,I"}, "lead(s) given more than once: I"),
        ({"--resume": True}, "--resume: no search state"),
        ({"--from-study": str(tmp_path / "nostudy")}, "no best.json there"),
        ({"--model": "resnet9000"}, "unknown model 'resnet9000'"),
        ({"--set": "lr=-1"}, "invalid setting lr=-1"),
        ({"--classifier": "x.ckpt"}, "need --reconstruct"),
        ({"--data": str(tmp_path / "nope")}, "no such cache"),
        ({"--workers-per-trial": "2"}, "multi-worker training runs on Ray"),
    ]
    for over, msg in cases:
        assert main(args(**over)) == 2, over
        err = capsys.readouterr().err
        assert msg in err, (over, err)
    assert not (tmp_path / "out" / "state.json").exists()   # nothing was started


def test_hyperparameters_come_from_a_study_or_config_file_with_overrides(tmp_path):
    from ecgsearch.cli import build_parser
    from ecgsearch.cli.rle import _base_config

    study = tmp_path / "study"
    study.mkdir()
    (study / "best.json").write_text(json.dumps({"score": 0.9, "config": {"model": "mlresnet", "lr": 3e-4,
                                                                          "model_kwargs": {"dropout": 0.3}}}))
    parser = build_parser()
    args = parser.parse_args(["rle", "--data", "d", "--task", "rhythm", "--model", "mlresnet_tiny",
                              "--from-study", str(study), "--set", "batch_size=16", "--epochs", "3"])
    cfg = _base_config(args)
    assert (cfg.lr, cfg.model_kwargs, cfg.batch_size) == (3e-4, {"dropout": 0.3}, 16)
    # the epoch budget is the search's own setting, not the study's, and never a --set
    assert args.epochs == 3 and cfg.epochs == 10
    from ecgsearch.cli.rle import _settings

    with pytest.raises(ValueError, match="--set epochs=5: a search's epoch budget"):
        _settings(parser.parse_args(["rle", "--data", "d", "--task", "rhythm", "--model", "mlresnet_tiny",
                                     "--set", "epochs=5"]))
    plain = tmp_path / "cfg.json"
    plain.write_text(json.dumps({"lr": 0.02, "seed": 7}))
    cfg = _base_config(parser.parse_args(["subsets", "--k", "2", "--data", "d", "--task", "age", "--model", "m",
                                          "--config", str(plain)]))
    assert (cfg.lr, cfg.seed) == (0.02, 7)
    (study / "best.json").write_text(json.dumps({"score": 0.9}))
    with pytest.raises(ValueError, match="best.json has no \"config\" object"):
        _base_config(args)
    plain.write_text(json.dumps({"lr": 0.02, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown training setting.*colour"):
        _base_config(parser.parse_args(["rle", "--data", "d", "--task", "age", "--model", "m", "--config",
                                        str(plain)]))

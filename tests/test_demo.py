"""`make demo`'s pipeline end to end at the suite's size (`--quick`): real Ray, real MLflow.

Synthesis, cache, a 12-lead classifier, a Tune + Optuna study, RLE from the study's best
config with repeats and the shared masked model, and reconstruction: the planted leads
(V2, AVL) must be the two kept, and the run must end with the non-inferiority answer.
"""
from __future__ import annotations

import json

import pytest
from ray_fixtures import ray_session  # noqa: F401

from ecgsearch import demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quick_demo_keeps_the_planted_leads_and_answers(ray_session, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--seed", "0", "--repeats", "2"]) == 0
    console = capsys.readouterr()
    rle = json.loads((out / "rle" / "rle.json").read_text())
    assert rle["kept"] == ["AVL", "V2"], rle["elimination_order"]
    assert rle["settings"]["repeats"] == 2 and rle["settings"]["eval_model"] == "shared"
    # the search's epoch budget, not the study's 2 epochs, governed every training
    assert rle["settings"]["epochs"] == 12
    assert all(r["budget"] == 12 for r in rle["reference"]["training"]["runs"])
    lines = console.out.strip().splitlines()
    assert lines[-4].startswith("planted informative leads: V2,AVL; RLE kept: AVL,V2 (both planted leads kept)")
    assert lines[-3] == f"answer: {rle['answer_line']}"
    # Ray's own output stayed in the log files, out of the user's console
    text = console.out + console.err
    assert "(pid=" not in text and "Trial status" not in text and "TensorBoard" not in text
    assert (out / "rle" / "ray.log").stat().st_size > 0
    assert (out / "mlflow.db").is_file() and (out / "reconstruct" / "reconstruct.json").is_file()
    # one store, one experiment: the study, the lead search and the reconstruction side by side
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("ecgsearch-rhythm")
    kinds = {r.data.tags.get("kind") for r in c.search_runs([exp.experiment_id])
             if "mlflow.parentRunId" not in r.data.tags}
    assert {"study", "search", "reconstruction"} <= kinds, kinds

"""`ecgsearch subsets` through the CLI: exhaustive ranking, RLE placement, bad settings.

Runs in-process (`--executor local`) on the planted synthetic set (label information in
AVL and V2 only), so the best pair of a pool holding both is known in advance.
"""
from __future__ import annotations

import json

import pytest

from ecgsearch.cli import main
from ecgsearch.engine import TrainConfig
from ecgsearch.leads import LEADS

POOL = "I,AVL,V2,V5"
SPLITS = {"train": [1, 2, 3, 4, 5, 6, 7], "val": [8, 9], "test": [10]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(make_synth_cache, tmp_path_factory):
    """An eval-mode RLE of the pool down to 2 leads (with baselines and --reconstruct), then
    subsets --k 2 --rle."""
    cache = make_synth_cache(records=360, seed=0, informative_leads=("V2", "AVL"))
    tmp = tmp_path_factory.mktemp("subsets")
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(TrainConfig(batch_size=16, lr=5e-3, n_samples=512, bootstrap=20,
                                          precision="fp32", threads=1, splits=SPLITS,
                                          model_kwargs={"stem_stride": 2, "lead_dropout": 0.1}).to_dict()))
    common = ["--data", str(cache), "--task", "superclass", "--model", "mlresnet_tiny", "--mode", "eval",
              "--config", str(cfg), "--no-tracking", "--executor", "local", "--repeats", "1", "--epochs", "6",
              "--eval-model", "per-step"]
    rle_out = tmp / "rle"
    assert main(["rle", *common, "--start-leads", POOL, "--min-leads", "2",
                 "--reconstruct", "--recon-model", "uresnet_tiny", "--recon-epochs", "1",
                 "--out", str(rle_out)]) == 0
    sub_out = tmp / "sub"
    assert main(["subsets", *common, "--k", "2", "--pool", POOL, "--rle", str(rle_out), "--out", str(sub_out)]) == 0
    return {"common": common, "rle": rle_out, "sub": sub_out, "tmp": tmp}


def test_every_pair_is_ranked_and_the_planted_pair_wins(searched):
    res = json.loads((searched["sub"] / "subsets.json").read_text())
    ranking = res["ranking"]
    assert len(ranking) == 6                                   # C(4, 2)
    assert {r["leads_key"] for r in ranking} == {"I,AVL", "I,V2", "I,V5", "AVL,V2", "AVL,V5", "V2,V5"}
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and ranking[0]["rank"] == 1
    assert ranking[0]["leads_key"] == "AVL,V2"
    # the pair without either planted lead is last
    assert ranking[-1]["leads_key"] == "I,V5"
    # every subset carries its delta against 12 leads with a verdict, and the table shows them
    for row in ranking:
        d = row["noninferiority"]
        assert d["ci"][0] <= d["delta"] <= d["ci"][1] and d["verdict"] in ("non-inferior", "inconclusive", "inferior")
    assert not ranking[-1]["noninferiority"]["noninferior"]     # no planted lead at all
    assert "| 6 | I,V5 |" in (searched["sub"] / "subsets.md").read_text()


def test_report_states_where_the_rle_choice_ranks(searched):
    rle = json.loads((searched["rle"] / "rle.json").read_text())
    res = json.loads((searched["sub"] / "subsets.json").read_text())
    assert rle["kept"] == ["AVL", "V2"]
    place = res["rle"]
    assert place["leads_key"] == "AVL,V2" and place["rank"] == 1 and place["of"] == 6
    assert place["gap_to_best"] == 0.0
    md = (searched["sub"] / "subsets.md").read_text()
    assert "RLE's choice AVL,V2 ranks 1 of 6" in md
    # the exhaustive search scored the RLE subset with the same model type on the same fold
    assert place["score"] == res["ranking"][0]["score"]


def test_rle_table_holds_the_challenge_baselines(searched):
    from ecgsearch.leads import CHALLENGE_SUBSETS

    rle = json.loads((searched["rle"] / "rle.json").read_text())
    assert [b["name"] for b in rle["baselines"]] == list(CHALLENGE_SUBSETS)
    for b in rle["baselines"]:
        assert tuple(b["leads"]) == CHALLENGE_SUBSETS[b["name"]] and b["n_leads"] == len(b["leads"])
        lo, hi = b["test"]["ci"]["macro_auprc"]
        assert lo <= b["test"]["macro_auprc"] <= hi
    # trained once: the 12-lead baseline is the model the reconstruction used as classifier
    assert rle["reconstruction"]["classifier"].endswith("models/I-II-III-AVR-AVL-AVF-V1-V2-V3-V4-V5-V6/seed0/model.ckpt")
    md = (searched["rle"] / "rle.md").read_text()
    assert "## Baselines (PhysioNet/CinC Challenge 2021 reduced sets)" in md and "| 3-lead: I,II,V2 | 3 |" in md


def test_rle_reconstruct_flag_rebuilds_from_the_kept_leads(searched):
    rle = json.loads((searched["rle"] / "rle.json").read_text())
    rec = rle["reconstruction"]
    assert rec["leads"] == ["AVL", "V2"] and rec["model"] == "uresnet_tiny"
    rebuilt = [x for x in LEADS if x not in ("AVL", "V2")]
    assert rec["reconstruction"]["rebuilt_leads"] == rebuilt and list(rec["reconstruction"]["r"]) == rebuilt
    assert list(rec["reconstruction"]["inputs"]["r"]) == ["AVL", "V2"]
    n = {k: v["n_records"] for k, v in rec["classifier_test"].items()}
    assert set(n) == {"true_12", "rebuilt_12", "kept_zeroed"} and len(set(n.values())) == 1
    assert "Reconstruction from AVL,V2" in (searched["rle"] / "rle.md").read_text()


def test_bad_subset_settings_are_clear_errors(searched, capsys):
    common, tmp = searched["common"], searched["tmp"]
    assert main(["subsets", *common, "--k", "4", "--pool", POOL, "--out", str(tmp / "e1")]) == 2
    assert "k=4: must be smaller than the pool (4 leads)" in capsys.readouterr().err
    assert main(["subsets", *common, "--k", "2", "--pool", POOL, "--out", str(searched["sub"])]) == 2
    assert "already holds a search; pass --resume" in capsys.readouterr().err
    assert main(["subsets", *common, "--k", "1", "--pool", POOL, "--rle", str(searched["rle"]),
                 "--out", str(tmp / "e3")]) == 2
    assert "the RLE path has no 1-lead set (it covers 2..4 leads)" in capsys.readouterr().err
    assert main(["subsets", *common, "--k", "2", "--pool", "I,V9", "--out", str(tmp / "e4")]) == 2
    assert "unknown lead 'V9'" in capsys.readouterr().err
    assert main(["subsets", *common, "--k", "2", "--pool", POOL, "--max-failures", "-3", "--out", str(tmp / "e5")]) == 2
    assert "max_failures=-3: -1 (forever) or a whole number >= 0" in capsys.readouterr().err

"""Reconstruction: rebuilt records keep the cache's geometry, and `ecgsearch reconstruct` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ecgsearch.cli import main
from ecgsearch.data.cache import load_cache
from ecgsearch.engine import TrainConfig, evaluate, train
from ecgsearch.engine import prep as P
from ecgsearch.leads import LEADS
from ecgsearch.search.reconstruct import memory_cache, rebuild_signals

KEPT = ("I", "II", "V2")
FAST = dict(batch_size=32, bootstrap=20, precision="fp32", threads=1)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(synth_cache, tmp_path_factory):
    """A 12-lead classifier and a 1-epoch U-ResNet on the session's physiological synthetic set."""
    out = tmp_path_factory.mktemp("recon")
    clf = train(TrainConfig(model="resnet1d_tiny", task="superclass", epochs=1, **FAST), synth_cache, out / "clf")
    rec = train(TrainConfig(model="uresnet_tiny", task="reconstruct", leads=KEPT, epochs=1, **FAST), synth_cache,
                out / "rec")
    return synth_cache, out, clf.checkpoint_path, rec.checkpoint_path


def test_rebuilt_records_have_cache_geometry_and_a_perfect_rebuild_reads_like_the_truth(trained, monkeypatch):
    cache, _, clf, rec = trained
    data = load_cache(cache)
    idx, true, rebuilt = rebuild_signals(rec, data, "test")
    assert rebuilt.shape == true.shape == (len(idx), 12, data.n_samples)
    np.testing.assert_array_equal(true, data.signals_mv(idx))
    assert not np.allclose(rebuilt, true, atol=1e-3)          # one epoch: far from perfect

    # Swap the U-ResNet for an oracle that returns the true signal in the model's own
    # (padded) geometry: undoing the geometry must give back the cache records exactly,
    # and the classifier must read the in-memory rebuilt cache exactly like the real one.
    def oracle(model, prep, data_, idx_, **kw):
        y = prep.source.read(idx_)
        return y, y.copy()
    monkeypatch.setattr(P, "predict", oracle)
    idx2, true2, perfect = rebuild_signals(rec, data, "test")
    np.testing.assert_allclose(perfect, true2, atol=1e-6)
    monkeypatch.undo()
    mem = memory_cache(data, idx2, perfect, "oracle rebuild")
    a = evaluate(clf, data, "test", bootstrap=0)
    b = evaluate(clf, mem, "test", bootstrap=0)
    assert a["n_records"] == b["n_records"] == len(idx2)
    assert b["macro_auprc"] == pytest.approx(a["macro_auprc"], abs=1e-6)
    assert b["auroc"] == pytest.approx(a["auroc"], abs=1e-6)


def test_reconstruct_cli_reports_per_lead_fidelity_and_three_classifier_readings(trained, capsys):
    cache, out, clf, _ = trained
    dest = out / "cli"
    rc = main(["reconstruct", "--data", str(cache), "--leads", "V2,I,II", "--classifier", str(clf),
               "--model", "uresnet_tiny", "--epochs", "3", "--set", "batch_size=32", "--set", "threads=1",
               "--set", "precision=fp32", "--bootstrap", "20", "--out", str(dest)])
    assert rc == 0
    res = json.loads((dest / "reconstruct.json").read_text())
    assert res["leads"] == list(KEPT) and res["classifier_metric"] == "macro_auprc"
    r, rmse = res["reconstruction"]["r"], res["reconstruction"]["rmse"]
    assert list(r) == list(LEADS) and all(v > 0 for v in rmse.values())
    # The reported fidelity is measured on the records as the cache holds them (never on
    # the model's padded input): recompute Pearson r and RMSE of two leads independently.
    idx, true, rebuilt = rebuild_signals(res["checkpoint"], load_cache(cache), "test")
    assert res["reconstruction"]["n"] == len(idx)
    for lead in ("III", "V5"):
        j = LEADS.index(lead)
        per_record = [np.corrcoef(t, p)[0, 1] for t, p in zip(true[:, j], rebuilt[:, j])]
        assert r[lead] == pytest.approx(np.mean(per_record), abs=1e-5)
        assert rmse[lead] == pytest.approx(np.sqrt(((true[:, j] - rebuilt[:, j]) ** 2).mean(axis=1)).mean(),
                                           rel=1e-5)
    readings = res["classifier_test"]
    assert set(readings) == {"true_12", "rebuilt_12", "kept_zeroed"}
    assert len({v["n_records"] for v in readings.values()}) == 1
    assert readings["kept_zeroed"]["dropped_leads"] == [x for x in LEADS if x not in KEPT]
    for v in readings.values():
        lo, hi = v["ci"]["macro_auprc"]
        assert lo <= v["macro_auprc"] <= hi
    md = (dest / "reconstruct.md").read_text()
    assert "Reconstruction from I,II,V2" in md and "| III |" in md
    with pytest.raises(SystemExit):
        main(["reconstruct", "--data", str(cache), "--classifier", str(clf), "--out", str(dest)])  # no --leads
    assert main(["reconstruct", "--data", str(cache), "--leads", "I,II", "--classifier", str(out / "nope.ckpt"),
                 "--out", str(dest / "x")]) == 2
    assert "--classifier" in capsys.readouterr().err

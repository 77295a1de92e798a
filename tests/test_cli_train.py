"""`ecgsearch train / evaluate / predict` end to end on real files."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly

from ecgsearch.cli import main
from ecgsearch.cli.train import _config, _operating_summary
from ecgsearch.engine import load_checkpoint, predict_split
from ecgsearch.leads import LEADS
from ecgsearch.metrics import operating_point_metrics


@pytest.fixture(scope="module")
def trained(synth_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--data", str(synth_cache), "--model", "resnet1d_tiny", "--task", "rhythm",
               "--leads", "V1,I,II", "--epochs", "2", "--out", str(out), "--set", "threads=1",
               "--set", "bootstrap=100", "--set", "precision=\"fp32\"",
               "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}"])
    assert rc == 0
    return out


def test_train_logs_one_mlflow_run_that_resume_continues(trained, synth_cache, capsys):
    """Every epoch, the test metrics with their CIs, the config and the files land in one MLflow
    run; --resume reopens that run and adds the next epochs to it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{trained.parent / 'mlflow.db'}"
    saved = json.loads((trained / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == uri
    client = MlflowClient(uri)
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "ecgsearch-rhythm"
    assert run.data.tags["kind"] == "train" and run.data.tags["leads"] == "I,II,V1" and run.data.tags["n_leads"] == "3"
    assert run.data.params["cfg.model"] == "resnet1d_tiny" and run.data.params["cfg.epochs"] == "2"
    m = json.loads((trained / "metrics.json").read_text())
    assert run.data.metrics["test/macro_auroc"] == pytest.approx(m["test"]["macro_auroc"])
    assert run.data.metrics["test/ci/macro_auroc/lo"] == pytest.approx(m["test"]["ci"]["macro_auroc"][0])
    assert "test_operating/macro_f1" in run.data.metrics
    assert [h.step for h in client.get_metric_history(run.info.run_id, "score")] == [1, 2]
    assert {"config.json", "metrics.json", "model.ckpt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    rc = main(["train", "--data", str(synth_cache), "--config", str(trained / "config.json"), "--epochs", "3",
               "--out", str(trained), "--resume", "--tracking-uri", uri])
    assert rc == 0 and f"MLflow run {saved['run_id']}" in capsys.readouterr().out
    assert json.loads((trained / "mlflow_run.json").read_text())["run_id"] == saved["run_id"]
    assert [h.step for h in client.get_metric_history(saved["run_id"], "score")] == [1, 2, 3]
    assert client.get_run(saved["run_id"]).info.status == "FINISHED"


def test_train_writes_checkpoint_and_metrics(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["config"]["leads"] == ["I", "II", "V1"]  # canonical order
    for split in ("val", "test"):
        s = m[split]
        assert 0 <= s["macro_auprc"] <= 1 and 0 <= s["macro_auroc"] <= 1
        assert set(s["auprc"]) == {"1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH"}
    lo, hi = m["test"]["ci"]["macro_auroc"]
    assert lo <= m["test"]["macro_auroc"] <= hi
    assert (trained / "model.ckpt").exists() and (trained / "last" / "model.ckpt").exists()


def test_metrics_file_has_test_operating_points_at_validation_thresholds(trained, synth_cache):
    ops = json.loads((trained / "metrics.json").read_text())["operating_points"]
    ck = load_checkpoint(trained / "model.ckpt")
    assert ops["split"] == "test" and ops["threshold_split"] == "val"
    assert set(ops["thresholds"]) == set(ck.thresholds)
    for c, t in ck.thresholds.items():           # NaN survives JSON as NaN
        assert ops["thresholds"][c] == pytest.approx(t, nan_ok=True)
    _, y, p = predict_split(ck, synth_cache, "test")
    want = operating_point_metrics(y, p, ck.thresholds, list(ck.thresholds))
    assert ops["n"] == len(y)
    for key in ("f1", "sensitivity", "specificity"):
        for c in ck.thresholds:
            assert ops[key][c] == pytest.approx(want[key][c], nan_ok=True), (key, c)
    assert ops["macro_f1"] == pytest.approx(want["macro_f1"])
    assert len(ops["ci"]) == 1 + 3 * 6                 # bootstrap=100 from the config
    lo, hi = ops["ci"]["macro_f1"]
    assert lo <= ops["macro_f1"] <= hi


def test_operating_summary_prints_each_class_with_cis(capsys):
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]], dtype=float)
    p = np.array([[0.9, 0.2], [0.3, 0.6], [0.7, 0.9], [0.1, 0.5], [0.4, 0.4], [0.6, 0.7]])
    m = operating_point_metrics(y, p, [0.5, 0.55], ["AFIB", "STACH"], bootstrap=50)
    _operating_summary({**m, "split": "test", "threshold_split": "val"})
    out = capsys.readouterr().out.splitlines()
    assert "thresholds from val" in out[0] and f"macro_f1={m['macro_f1']:.3f}" in out[0]
    afib = next(line for line in out if line.split()[0] == "AFIB")
    lo, hi = m["ci"]["sensitivity/AFIB"]
    assert "t=0.500" in afib and f"sens={m['sensitivity']['AFIB']:.3f} [{lo:.3f}, {hi:.3f}]" in afib
    assert len(out) == 3


def test_config_accepts_a_packaged_preset_name():
    args = argparse.Namespace(config="ribeiro2020", model=None, task=None, epochs=None, leads="I,II",
                              overrides=["epochs=2"])
    cfg = _config(args)
    assert (cfg.model, cfg.target_fs, cfg.n_samples, cfg.epochs, cfg.leads) == ("resnet1d", 400, 4096, 2, ("I", "II"))


def test_evaluate_json_matches_metrics_file(trained, synth_cache, capsys):
    rc = main(["evaluate", "--checkpoint", str(trained / "model.ckpt"), "--data", str(synth_cache),
               "--split", "test", "--bootstrap", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ref = json.loads((trained / "metrics.json").read_text())["test"]
    assert out["macro_auroc"] == pytest.approx(ref["macro_auroc"])


def test_predict_reads_any_rate_order_and_case(trained, synth_root, tmp_path, capsys):
    rec = sorted((synth_root / "records100").rglob("*.hea"))[0].with_suffix("")
    x, fields = wfdb.rdsamp(str(rec))
    # Same signal, channels shuffled, lower-case names, an extra channel: identical predictions.
    order = [7, 0, 11, 3, 1, 6, 2, 4, 5, 8, 9, 10]
    names = [fields["sig_name"][i].lower() for i in order] + ["resp"]
    sig = np.column_stack([x[:, order], np.zeros(len(x))])
    wfdb.wrsamp("shuffled", fs=100, units=["mV"] * 13, sig_name=names, p_signal=sig, fmt=["16"] * 13,
                write_dir=str(tmp_path))
    # The same signal at 200 Hz: close predictions after resampling back to the model's rate.
    up = resample_poly(x, 2, 1, axis=0)
    wfdb.wrsamp("fast", fs=200, units=["mV"] * 12, sig_name=list(fields["sig_name"]), p_signal=up,
                fmt=["16"] * 12, write_dir=str(tmp_path))
    ckpt = str(trained / "model.ckpt")
    assert main(["predict", "--checkpoint", ckpt, str(rec), str(tmp_path / "shuffled"),
                 str(tmp_path / "fast"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["fs_in"] for r in rows] == [100, 100, 200]
    codes = ["1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH"]
    a, b, c = (np.array([r[k] for k in codes]) for r in rows)
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(a, c, atol=0.05)
    assert ((a >= 0) & (a <= 1)).all()


def test_predict_names_the_missing_lead(trained, tmp_path, capsys):
    sig = np.random.default_rng(0).normal(0, 0.1, (1000, 11))
    names = [n for n in LEADS if n != "V1"]
    wfdb.wrsamp("nov1", fs=100, units=["mV"] * 11, sig_name=names, p_signal=sig, fmt=["16"] * 11,
                write_dir=str(tmp_path))
    rc = main(["predict", "--checkpoint", str(trained / "model.ckpt"), str(tmp_path / "nov1")])
    err = capsys.readouterr().err
    assert rc == 2 and "V1" in err and "nov1" in err


def test_train_rejects_bad_settings(synth_cache, tmp_path, capsys):
    rc = main(["train", "--data", str(synth_cache), "--model", "resnet1d_nope", "--task", "rhythm",
               "--epochs", "1", "--out", str(tmp_path)])
    assert rc == 2 and "resnet1d_nope" in capsys.readouterr().err
    rc = main(["train", "--data", str(synth_cache), "--leads", "I,II,I", "--out", str(tmp_path)])
    assert rc == 2 and "more than once" in capsys.readouterr().err
    rc = main(["train", "--data", str(synth_cache), "--config", "ribeiro2021", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "ribeiro2021" in err and "presets: ribeiro2020" in err

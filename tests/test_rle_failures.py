"""A candidate that fails is a FAILED MLflow run carrying its error, and the search says which."""
from __future__ import annotations

import pytest

from ecgsearch.engine import TrainConfig
from ecgsearch.search import candidates
from ecgsearch.search.candidates import UnitError
from ecgsearch.search.context import SearchSettings
from ecgsearch.search.pipeline import run_rle


def test_failed_candidate_is_a_failed_run_with_its_error(synth_cache, tmp_path, monkeypatch):
    real_train = candidates._KINDS["train"]

    def train_or_fail(unit):   # injected fault: one candidate's training breaks
        if unit["leads"] == ["I", "II"]:
            raise RuntimeError("injected fault: out of memory")
        return real_train(unit)

    monkeypatch.setitem(candidates._KINDS, "train", train_or_fail)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = SearchSettings(data=str(synth_cache), task="rhythm", model="mlresnet_tiny", out=tmp_path / "out",
                       mode="retrain", start_leads=("I", "II", "V2"), min_leads=2, repeats=1, epochs=1,
                       base=TrainConfig(batch_size=32, n_samples=256, bootstrap=10, threads=1, precision="fp32"),
                       executor="local", tracking_uri=uri, experiment="fail-test", baselines=False)
    with pytest.raises(UnitError, match="injected fault: out of memory") as info:
        run_rle(s)
    assert list(info.value.failed) == ["train:I,II@0"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fail-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    failed = runs["step01-without-V2"]
    assert failed.info.status == "FAILED" and "out of memory" in failed.data.tags["error"]
    assert failed.data.params["leads"] == "I,II"
    parent = next(r for r in runs.values() if r.info.run_name.startswith("rle-"))
    assert parent.info.status == "FAILED"

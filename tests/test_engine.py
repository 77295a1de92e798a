"""Engine: configs, checkpoints, resume, repeatability, lead dropping, CLI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecgsearch.data.cache import load_cache
from ecgsearch.engine import prep as P
from ecgsearch.engine import TrainConfig, apply_overrides, evaluate, load_checkpoint, train
from ecgsearch.engine.runtime import epoch_order

FAST = dict(model="resnet1d_tiny", task="rhythm", epochs=2, batch_size=64, bootstrap=0, precision="fp32", threads=1)


def test_config_rejects_unknown_and_bad_settings():
    with pytest.raises(ValueError, match="unknown training setting.*colour"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="fold 9 is in both"):
        TrainConfig(splits={"train": [1, 9], "val": [9], "test": [10]})
    with pytest.raises(ValueError, match="unknown lead 'V7'"):
        TrainConfig(leads=("I", "V7"))
    cfg = apply_overrides(TrainConfig(), ["lr=0.01", "model_kwargs.dropout=0.3", "leads=[\"V2\", \"I\"]"])
    assert cfg.lr == 0.01 and cfg.model_kwargs == {"dropout": 0.3} and cfg.leads == ("I", "V2")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown training setting 'nope'"):
        apply_overrides(cfg, ["nope=1"])


def test_epoch_order_matches_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for world, n in ((1, 10), (2, 11), (3, 7)):
        for rank in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            s.set_epoch(3)
            assert list(s) == epoch_order(n, 5, 3, rank, world).tolist()


def test_checkpoint_carries_resolved_config_and_resume_follows_same_path(synth_cache, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 3})
    straight = train(cfg, synth_cache, tmp_path / "a")
    ck = load_checkpoint(tmp_path / "a" / "model.ckpt")
    assert ck.cfg == cfg and ck.leads == cfg.leads and ck.fs == 100 and ck.n_samples == 1024
    assert ck.epoch == straight.best_epoch and len(ck.norm.mean) == 12
    raw = torch.load(tmp_path / "a" / "model.ckpt", weights_only=True)  # no pickled code needed
    assert raw["train_config"]["model"] == "resnet1d_tiny"

    # Stop after 2 epochs, then resume to 3: the history must equal the uninterrupted run's.
    part = train(cfg.replace(epochs=2), synth_cache, tmp_path / "b")
    assert part.start_epoch == 1 and len(part.history) == 2
    resumed = train(cfg, synth_cache, tmp_path / "b", resume_from=tmp_path / "b" / "last" / "model.ckpt")
    assert resumed.start_epoch == 3
    for h_a, h_b in zip(straight.history, resumed.history):
        assert h_a["train_loss"] == pytest.approx(h_b["train_loss"], rel=1e-5)
        assert h_a["score"] == pytest.approx(h_b["score"], rel=1e-5, nan_ok=True)
    with pytest.raises(ValueError, match="config differs in lr"):
        train(cfg.replace(lr=0.5), synth_cache, tmp_path / "c", resume_from=tmp_path / "b" / "last" / "model.ckpt")


def test_same_seed_repeats_and_other_seed_differs(synth_cache):
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    a, b = train(cfg, synth_cache), train(cfg, synth_cache)
    c = train(cfg.replace(seed=1), synth_cache)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]


def test_evaluate_with_dropped_leads(synth_cache):
    cfg = TrainConfig(**{**FAST, "model": "mlresnet_tiny", "epochs": 1, "leads": ("I", "II", "V1", "V2")})
    res = train(cfg, synth_cache)
    full = evaluate(res.state, synth_cache, "val", bootstrap=0)
    dropped = evaluate(res.state, synth_cache, "val", bootstrap=0, drop_leads=("V1",))
    assert dropped["dropped_leads"] == ["V1"] and full["n_records"] == dropped["n_records"]
    # Dropping a branch must equal a fresh 3-lead model holding the same weights.
    data = load_cache(synth_cache)
    prep = P.from_checkpoint(res.state, data)
    idx = P.split_indices(data, prep.task, cfg.splits, "val")[:16]
    x, _ = P.batch(prep, data, idx)
    with torch.no_grad():
        a = res.model(torch.from_numpy(x), lead_mask=torch.tensor([True, True, False, True]))
        b = res.model.select_leads([0, 1, 3])(torch.from_numpy(x[:, [0, 1, 3]]))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot drop lead.*V6"):
        evaluate(res.state, synth_cache, "val", drop_leads=("V6",))


def test_bootstrap_cis_on_test_fold(synth_cache):
    res = train(TrainConfig(**{**FAST, "epochs": 1}), synth_cache)
    m = evaluate(res.state, synth_cache, "test", bootstrap=200)
    lo, hi = m["ci"]["macro_auroc"]
    assert lo <= m["macro_auroc"] <= hi and hi - lo > 0
    assert not math.isnan(m["macro_auprc"])

"""Engine: configs, checkpoints, resume, repeatability, lead dropping, CLI."""
from __future__ import annotations

import ast
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ecgsearch.data.cache import load_cache, prepare
from ecgsearch.data.synth import synthesize
from ecgsearch.engine import prep as P
from ecgsearch.engine import TrainConfig, apply_overrides, evaluate, load_checkpoint, predict_split, train
from ecgsearch.engine.runtime import cpu_bf16_supported, epoch_order
from ecgsearch.metrics import f1_max_thresholds
from ecgsearch.models import create_model
from ecgsearch.tasks import get_task

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


# ------------------------------------------------------- superclass without a label

@pytest.fixture(scope="module")
def unlabeled_cache(tmp_path_factory):
    """A synthetic cache where some NORM-only records lost their one diagnostic statement.

    Those records keep their rhythm codes (SR, AFIB, ...), so their rhythm labels do not
    change; only their superclass row becomes all zero, as for undiagnosed PTB-XL records.
    Returns (cache path, ecg_ids without a superclass).
    """
    base = tmp_path_factory.mktemp("unlabeled")
    root = base / "root"
    synthesize(root, 150, seed=3, fs="100", enrich=True)
    db = pd.read_csv(root / "ptbxl_database.csv")
    codes = db["scp_codes"].map(ast.literal_eval)
    norm_only = db.index[codes.map(lambda c: "NORM" in c and not set(c) - {"NORM", "SR", "AFIB", "STACH", "SBRAD"})]
    # every other NORM-only record of each fold, so train, val and test all lose some
    chosen = pd.Index([i for _, g in db.loc[norm_only].groupby("strat_fold") for i in g.index[::2]])
    db.loc[chosen, "scp_codes"] = [str({k: v for k, v in codes[i].items() if k != "NORM"}) for i in chosen]
    db.to_csv(root / "ptbxl_database.csv", index=False)
    prepare(root, base / "cache", 100)
    return base / "cache", set(db.loc[chosen, "ecg_id"].astype(int))


def test_superclass_splits_leave_out_unlabeled_records_unless_kept(unlabeled_cache):
    path, dropped = unlabeled_cache
    data = load_cache(path)
    splits = TrainConfig().splits
    ids = data.meta["ecg_id"].to_numpy()
    sup, rhy = get_task("superclass"), get_task("rhythm")
    for split, folds in splits.items():
        in_folds = np.flatnonzero(np.isin(data.meta["strat_fold"].to_numpy(), folds))
        gone = dropped & set(ids[in_folds])
        assert gone, f"fixture must drop a record from {split}"
        default = P.split_indices(data, sup, splits, split)
        assert set(ids[default]) == set(ids[in_folds]) - gone
        assert not (data.labels("superclass", default).sum(axis=1) == 0).any()
        kept = P.split_indices(data, sup, splits, split, keep_unlabeled=True)
        np.testing.assert_array_equal(kept, in_folds)
        # rhythm: a record with none of the six codes is a negative, not unlabeled
        for keep in (False, True):
            np.testing.assert_array_equal(P.split_indices(data, rhy, splits, split, keep_unlabeled=keep), in_folds)
    # the engine's callers follow the config: fit (train), validation and predict_split (test)
    cfg = TrainConfig(**{**FAST, "task": "superclass", "epochs": 1})
    _, train_idx = P.fit(cfg, data)
    assert not dropped & set(ids[train_idx])
    _, train_all = P.fit(cfg.replace(keep_unlabeled=True), data)
    np.testing.assert_array_equal(train_all, P.split_indices(data, sup, splits, "train", keep_unlabeled=True))
    for keep in (False, True):
        res = train(cfg.replace(keep_unlabeled=keep), data)
        assert res.state.cfg.keep_unlabeled is keep
        for split in ("val", "test"):
            idx, _, _ = predict_split(res.state, data, split)
            np.testing.assert_array_equal(idx, P.split_indices(data, sup, splits, split, keep_unlabeled=keep))


def test_keep_unlabeled_must_be_a_bool_and_old_checkpoints_load(synth_cache, tmp_path):
    with pytest.raises(ValueError, match="keep_unlabeled='yes'"):
        TrainConfig(keep_unlabeled="yes")
    assert apply_overrides(TrainConfig(), ["keep_unlabeled=true"]).keep_unlabeled is True
    train(TrainConfig(**{**FAST, "epochs": 1}), synth_cache, tmp_path / "new")
    raw = torch.load(tmp_path / "new" / "model.ckpt", weights_only=True)
    assert isinstance(raw["thresholds"], dict)
    # a checkpoint written before these settings existed: no keep_unlabeled, no thresholds
    del raw["train_config"]["keep_unlabeled"], raw["thresholds"]
    torch.save(raw, tmp_path / "old.ckpt")
    ck = load_checkpoint(tmp_path / "old.ckpt")
    assert ck.cfg.keep_unlabeled is False and ck.thresholds is None


# --------------------------------------------- fp32 validation, stored thresholds

def test_validation_is_fp32_and_checkpoint_carries_its_thresholds(synth_cache, tmp_path):
    # Train under bf16 where the CPU has it: validation must still be fp32, so the stored
    # score and thresholds equal an fp32 re-scoring of the saved weights.
    precision = "bf16" if cpu_bf16_supported() else "fp32"
    cfg = TrainConfig(**{**FAST, "precision": precision})
    res = train(cfg, synth_cache, tmp_path)
    ck = load_checkpoint(tmp_path / "model.ckpt")
    assert ck.precision == precision and ck.epoch == res.best_epoch
    _, y, p = predict_split(ck, synth_cache, "val")
    want = f1_max_thresholds(y, p)
    assert list(ck.thresholds) == list(get_task("rhythm").output_names)
    np.testing.assert_allclose([ck.thresholds[c] for c in ck.thresholds], want, rtol=1e-6, equal_nan=True)
    assert list(res.state.thresholds) == list(ck.thresholds)
    np.testing.assert_array_equal(list(res.state.thresholds.values()), list(ck.thresholds.values()))
    val = evaluate(ck, synth_cache, "val", bootstrap=0)
    assert ck.score == pytest.approx(val["macro_auprc"], rel=1e-6)
    assert res.history[res.best_epoch - 1]["score"] == pytest.approx(val["macro_auprc"], rel=1e-6)
    # thresholds are the validation fold's: the test fold would pick others
    _, y_t, p_t = predict_split(ck, synth_cache, "test")
    assert not np.allclose(f1_max_thresholds(y_t, p_t), want, equal_nan=True)


def test_regression_checkpoints_have_no_thresholds(synth_cache):
    res = train(TrainConfig(**{**FAST, "task": "age", "epochs": 1}), synth_cache)
    assert res.state.thresholds is None


# ------------------------------------------------------------------ presets

def test_ribeiro_preset_gives_their_geometry(make_synth_cache, tmp_path, monkeypatch):
    cfg = TrainConfig.from_file("ribeiro2020")
    assert (cfg.model, cfg.task, cfg.target_fs, cfg.n_samples) == ("resnet1d", "rhythm", 400, 4096)
    assert (cfg.batch_size, cfg.lr, cfg.lr_factor, cfg.lr_patience) == (64, 1e-3, 0.1, 7)
    assert TrainConfig.from_file("ribeiro2020.json") == cfg
    data = load_cache(make_synth_cache(records=60, fs="500"))
    assert data.fs == 500
    prep, train_idx = P.fit(cfg, data)
    assert (prep.fs, prep.n_samples) == (400, 4096)
    x, y = P.batch(prep, data, train_idx[:2])
    assert x.shape == (2, 12, 4096) and y.shape == (2, 6)
    model = create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=4096).eval()
    with torch.no_grad():
        assert model(torch.from_numpy(x)).shape == (2, 6)
    # unknown names list the presets; a real file of the same name wins over the preset
    with pytest.raises(FileNotFoundError, match=r"ribeiro2021 does not exist.*presets: ribeiro2020"):
        TrainConfig.from_file("ribeiro2021")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ribeiro2020").write_text('{"epochs": 3}')
    assert TrainConfig.from_file("ribeiro2020").epochs == 3

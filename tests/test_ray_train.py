"""Ray Train around the engine: 1 worker == plain engine, 2-worker DDP agrees, a killed worker resumes."""
from __future__ import annotations

import pytest
from ray_fixtures import ray_session  # noqa: F401

from ecgsearch.distributed.raytrain import RayTrainSettings, export_best, fit
from ecgsearch.engine import TrainConfig, evaluate, load_checkpoint, train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CFG = TrainConfig(model="resnet1d_tiny", task="rhythm", epochs=3, batch_size=64, bootstrap=0, precision="fp32",
                  threads=1, seed=3)


@pytest.fixture(scope="module")
def plain(synth_cache):
    return train(CFG, synth_cache)


def test_killed_one_worker_trainer_resumes_and_reproduces_the_plain_engine(ray_session, plain,  # noqa: F811
                                                                          synth_cache, tmp_path):
    marker = tmp_path / "killed-once"
    run = fit(CFG, synth_cache, RayTrainSettings(workers=1, storage_path=str(tmp_path), name="kill",
                                                 max_failures=1, kill_after_epoch=1, kill_marker=str(marker)))
    assert "after epoch 1" in marker.read_text()        # the worker really was SIGKILLed after epoch 1
    # The restarted worker group began at epoch 2, from the epoch-1 checkpoint, not from scratch...
    assert run.start_epoch == 2 and run.metrics["epoch"] == CFG.epochs
    assert run.metrics["world_size"] == 1 and run.metrics["device"] == "cpu"
    # ...and one Ray worker (DistributedSampler order, one replica), through a kill and a resume,
    # ends exactly where the plain engine ends for the same seed.
    assert run.metrics["score"] == pytest.approx(plain.history[-1]["score"], rel=1e-6)
    assert run.metrics["train_loss"] == pytest.approx(plain.history[-1]["train_loss"], rel=1e-6)
    assert run.best_epoch == plain.best_epoch and run.best_score == pytest.approx(plain.best_score, rel=1e-6)
    # The latest checkpoint carries the best weights: exported, they score what training logged.
    best = export_best(run.checkpoint_dir, tmp_path / "best.ckpt")
    exported = load_checkpoint(tmp_path / "best.ckpt")
    assert exported.epoch == plain.best_epoch == best.epoch
    # the best epoch's F1-max thresholds, as in the plain engine's best checkpoint (not the last epoch's)
    assert exported.thresholds == pytest.approx(plain.state.thresholds, nan_ok=True)
    val = evaluate(tmp_path / "best.ckpt", synth_cache, "val", bootstrap=0)
    assert val["macro_auprc"] == pytest.approx(plain.best_score, rel=1e-5)


def test_two_worker_ddp_matches_one_worker(ray_session, plain, synth_cache, tmp_path):  # noqa: F811
    # batch_size is per worker: 2 x 32 sees, step by step, the same 64 records as 1 x 64 (rank r
    # takes every other record of the same permutation), so only BatchNorm statistics differ.
    two = fit(CFG.replace(batch_size=32), synth_cache,
              RayTrainSettings(workers=2, storage_path=str(tmp_path), name="two"))
    assert two.metrics["world_size"] == 2 and two.start_epoch == 1
    assert two.metrics["train_loss"] == pytest.approx(plain.history[-1]["train_loss"], rel=0.05)
    assert two.best_score == pytest.approx(plain.best_score, abs=0.05)


def test_settings_errors_are_named(tmp_path, synth_cache):
    with pytest.raises(ValueError, match="workers=0"):
        RayTrainSettings(workers=0).validate()
    with pytest.raises(ValueError, match="must be absolute"):
        RayTrainSettings(storage_path="relative/dir").validate()
    with pytest.raises(ValueError, match="kill_after_epoch needs kill_marker"):
        RayTrainSettings(kill_after_epoch=1).validate()
    from ecgsearch.distributed.raytrain import loop_config
    with pytest.raises(FileNotFoundError, match="data cache .*nope does not exist"):
        loop_config(CFG, tmp_path / "nope", RayTrainSettings())
    # per-unit fault injection of a lead search: the variable and the unit are named
    from ecgsearch.distributed.raytrain import FAULTS_ENV, unit_faults
    assert unit_faults({}) == {}
    with pytest.raises(ValueError, match=f"{FAULTS_ENV}: unit train:I@0: unknown key.* kill_epoch"):
        unit_faults({FAULTS_ENV: '{"train:I@0": {"kill_epoch": 1}}'})
    with pytest.raises(ValueError, match=f"{FAULTS_ENV}: not JSON"):
        unit_faults({FAULTS_ENV: "kill"})

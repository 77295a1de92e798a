"""How a study trial trains, on a real local Ray: one worker trains in the trial's own process
(no nested TorchTrainer), is killed after its first epoch and resumes from the checkpoint it
committed, ending where an uninterrupted engine run ends; two workers still run Ray Train DDP."""
from __future__ import annotations

import json

import pytest
import torch
from ray_fixtures import ray_session  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = {"model": "resnet1d_tiny", "task": "rhythm", "epochs": 2, "precision": "fp32", "bootstrap": 0,
        "threads": 1, "lr": 3e-3}
SPACE = {"format": "ecgsearch.search_space/1", "name": "one-point", "version": 1, "models": ["resnet1d_tiny"],
         "params": {"lr": {"type": "choice", "values": [3e-3]}}}


def test_trial_plan_one_worker_fits_in_the_trial_more_drive_a_torchtrainer():
    from ecgsearch.distributed.trials import TRIAL_RETRIES, trial_plan, trial_resources

    one = trial_plan(1, cpus_per_worker=2, gpus_per_worker=0.5, max_failures=2)
    assert one == {"kind": "fit", "cpus": 2, "gpus": 0.5, "retries": 2 + TRIAL_RETRIES}
    assert trial_resources(one["kind"], one["cpus"], one["gpus"]) == {"cpu": 2.0, "gpu": 0.5}
    assert trial_plan(1, 1, 0, max_failures=-1)["retries"] == -1        # forever stays forever
    assert trial_plan(2, 1, 1, max_failures=2) == {"kind": "train", "cpus": 0.0, "gpus": 0.0,
                                                   "retries": TRIAL_RETRIES}
    # asked for, one worker is a Ray Train run too (bench/rle_parallel.py compares the two)
    assert trial_plan(1, 2, 0, max_failures=2, in_trial=False)["kind"] == "train"


def test_a_search_executor_names_a_bad_runner_or_restart_budget(tmp_path):
    from ecgsearch.search.executors import RayTuneExecutor

    # refused before Ray is touched
    with pytest.raises(ValueError, match="train_runner='trainer'.*'trial' or 'torchtrainer'"):
        RayTuneExecutor(tmp_path, train_runner="trainer")
    with pytest.raises(ValueError, match="max_failures=-2"):
        RayTuneExecutor(tmp_path, max_failures=-2)


def test_a_killed_one_worker_trial_resumes_from_its_commit_and_ends_as_the_uninterrupted_run(
        ray_session, synth_cache, tmp_path):  # noqa: F811
    from ecgsearch.distributed import tune as study
    from ecgsearch.distributed.raytrain import CKPT_FILE, export_best
    from ecgsearch.distributed.space import parse_space
    from ecgsearch.distributed.trials import build_tuner, trial_plan
    from ecgsearch.engine import TrainConfig, load_checkpoint, train

    cfg = TrainConfig.from_dict(BASE)
    space = parse_space(json.dumps(SPACE), "test")
    marker = tmp_path / "killed-once"
    static = {"resolver": study.TrialResolver(space.text, space.source, cfg.to_dict()), "data": str(synth_cache),
              "train": {"workers": 1, "use_gpu": False, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0,
                        "max_failures": 1, "storage_path": str(tmp_path / "train"),
                        "kill_after_epoch": 1, "kill_marker": str(marker)}}
    plan = trial_plan(1, 1.0, 0.0, max_failures=1)
    from ray import tune

    tuner = build_tuner(study._trial, {"static": static}, kind=plan["kind"], name="runner", cpus=plan["cpus"],
                        gpus=plan["gpus"], retries=plan["retries"], storage_path=str(tmp_path / "ray"),
                        param_space=space.to_tune(), tune_config=tune.TuneConfig(num_samples=1))
    (result,) = list(tuner.fit())

    assert result.error is None and marker.exists()                      # it was killed, and recovered
    m = result.metrics
    assert m["runner"] == "trial" and m["world_size"] == 1              # trained in the trial process
    assert m["epoch"] == 2 and m["start_epoch"] == 2                     # the retry began at epoch 2
    run = tmp_path / "train" / f"trial-{m['trial_id']}"
    assert m["checkpoint_path"] == str(run / "checkpoint_000002")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_000002"]  # only the latest is kept

    plain = train(cfg, synth_cache)
    best = export_best(m["checkpoint_path"], tmp_path / "best.ckpt")
    assert best.epoch == plain.best_epoch and best.score == pytest.approx(plain.best_score, abs=1e-6)
    got = load_checkpoint(tmp_path / "best.ckpt").model.state_dict()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    last = load_checkpoint(run / "checkpoint_000002" / CKPT_FILE)
    assert last.epoch == 2 and last.extra["history"][0]["epoch"] == 1   # epoch 1's record survived the kill


def test_a_two_worker_study_trial_runs_ray_train_ddp(ray_session, synth_cache, tmp_path):  # noqa: F811
    from ecgsearch.distributed.tune import TuneSettings, run_study

    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    res = run_study(TuneSettings(data=synth_cache, model="resnet1d_tiny", task="rhythm", trials=1, epochs=1,
                                 out=tmp_path / "out", search_space=space, workers_per_trial=2,
                                 base_config={k: v for k, v in BASE.items() if k not in ("model", "task")},
                                 register_model=False, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert res.n_errors == 0 and res.best_ckpt.exists()
    rows = [json.loads(x) for x in (tmp_path / "out" / "ray").rglob("result.json").__next__().read_text().split("\n")
            if x.strip()]
    assert rows[-1]["runner"] == "torchtrainer" and rows[-1]["world_size"] == 2

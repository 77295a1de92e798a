"""Trial resources and concurrency follow the cluster's resources (pure logic, no Ray started)."""
from __future__ import annotations

import pytest

from ecgsearch.distributed.cluster import ClusterError, max_concurrent_trials, plan_trial_resources

CPU2 = {"CPU": 2.0, "memory": 2e10}
GPU_NODE = {"CPU": 32.0, "GPU": 4.0}


def test_cpu_cluster_concurrency_from_workers_per_trial():
    one = plan_trial_resources(1, None, CPU2)
    assert not one.use_gpu and one.per_worker() == {"CPU": 1.0}
    assert max_concurrent_trials(one, CPU2, None, trials=10) == 2
    assert max_concurrent_trials(one, CPU2, None, trials=1) == 1          # never more than trials
    two = plan_trial_resources(2, None, CPU2)
    assert two.total() == {"CPU": 2.0} and max_concurrent_trials(two, CPU2, None, 10) == 1
    with pytest.raises(ClusterError, match="one trial needs CPU=3 but the Ray cluster has CPU=2"):
        max_concurrent_trials(plan_trial_resources(3, None, CPU2), CPU2, None, 10)


def test_gpus_one_per_worker_by_default_and_whole_gpus_for_ddp():
    res = plan_trial_resources(2, None, GPU_NODE)
    assert res.use_gpu and res.per_worker() == {"CPU": 1.0, "GPU": 1.0}
    assert max_concurrent_trials(res, GPU_NODE, None, 10) == 2            # 4 GPUs / 2 per trial
    # Explicit 0 GPUs trains on CPU even on a GPU node.
    assert not plan_trial_resources(2, 0, GPU_NODE).use_gpu
    # One worker may take half a GPU (two trials share a device); DDP ranks may not.
    half = plan_trial_resources(1, 0.5, GPU_NODE)
    assert half.gpus_per_worker == 0.5 and max_concurrent_trials(half, GPU_NODE, None, 20) == 8
    with pytest.raises(ValueError, match="each DDP worker needs a whole number of GPUs"):
        plan_trial_resources(2, 1, GPU_NODE)
    with pytest.raises(ClusterError, match="has no GPUs"):
        plan_trial_resources(1, 1, CPU2)


def test_requested_concurrency_wins_and_bad_settings_are_named():
    res = plan_trial_resources(1, None, CPU2)
    assert max_concurrent_trials(res, CPU2, 1, 10) == 1
    assert max_concurrent_trials(res, CPU2, 5, 10) == 5                   # extra trials queue in Ray
    assert max_concurrent_trials(res, CPU2, 5, 3) == 3
    with pytest.raises(ValueError, match="max-concurrent=0"):
        max_concurrent_trials(res, CPU2, 0, 10)
    with pytest.raises(ValueError, match="workers-per-trial=0"):
        plan_trial_resources(0, None, CPU2)
    with pytest.raises(ValueError, match="gpus-per-trial=-1"):
        plan_trial_resources(1, -1, GPU_NODE)
    with pytest.raises(ValueError, match="cpus-per-worker=0"):
        plan_trial_resources(1, None, CPU2, cpus_per_worker=0)


def test_study_settings_fail_before_any_cluster_or_tracking_starts(tmp_path, monkeypatch):
    from ecgsearch.distributed.tune import TuneSettings, run_study

    monkeypatch.chdir(tmp_path)            # where the default store would be

    def settings(**kw):
        base = dict(data=tmp_path, model="resnet1d_tiny", task="rhythm", trials=2, out=tmp_path / "out")
        return TuneSettings(**{**base, **kw})

    with pytest.raises(ValueError, match="trials=0"):
        run_study(settings(trials=0))
    with pytest.raises(ValueError, match="reduction-factor=1"):
        run_study(settings(reduction_factor=1))
    with pytest.raises(FileNotFoundError, match="data cache .*missing does not exist"):
        run_study(settings(data=tmp_path / "missing"))
    with pytest.raises(ValueError, match="no packaged search space covers model 'resnet1d_huge'|unknown model"):
        run_study(settings(model="resnet1d_huge"))
    with pytest.raises(ValueError, match="unknown training setting"):
        run_study(settings(base_config={"colour": "red"}))
    # None of these got as far as tracking or Ray: nothing was written.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out" / "ray").exists()


def test_one_trial_layer_training_trials_hold_no_cpu_and_work_trials_hold_theirs():
    from ecgsearch.distributed.trials import TRIAL_MEMORY, trial_resources

    # A training trial only drives its TorchTrainer: a CPU held here would starve its own workers.
    assert trial_resources("train", cpus=4, gpus=1) == {"cpu": 0, "memory": TRIAL_MEMORY}
    assert trial_resources("work", cpus=2) == {"cpu": 2.0}
    assert trial_resources("work", cpus=1, gpus=0.5) == {"cpu": 1.0, "gpu": 0.5}
    with pytest.raises(ValueError, match="unknown trial kind 'predict'"):
        trial_resources("predict")


def test_studies_and_searches_build_their_tuners_in_the_one_trial_layer():
    import inspect

    from ecgsearch.distributed import tune as study
    from ecgsearch.search import candidates, executors

    for mod in (study, executors):
        src = inspect.getsource(mod)
        assert "build_tuner(" in src and "tune.Tuner(" not in src and "with_resources(" not in src, mod.__name__
        # and both plan a training trial the same way (in the trial, or a TorchTrainer)
        assert "trial_plan(" in src, mod.__name__
    assert "tune.Tuner(" not in inspect.getsource(candidates)

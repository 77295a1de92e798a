"""Distributed layer: Ray Train around the engine, Ray Tune + Optuna studies, MLflow logging.

Submodules import Ray/MLflow lazily where they can, so `ecgsearch --help` and the CLI's
argument checks stay fast and never start a cluster.

- `space`: versioned per-architecture search spaces (package JSON, overridable by file).
- `cluster`: start or join Ray; per-trial resources and concurrency from cluster resources.
- `mlflow_log`: tracking URI, preflight, parent/child runs that always end, registry.
- `raytrain`: the Ray Train worker function and `TorchTrainer` construction around `engine.train`.
- `tune`: a study (OptunaSearch TPE + ASHA), resume, best-trial export to best.json/best.ckpt.
- `study_log`: the driver-side Tune callback that writes trials to MLflow and OUT/events.jsonl.
"""

"""Distributed layer: Ray Train around the engine, Ray Tune + Optuna studies.

Submodules import Ray/MLflow lazily where they can, so `ecgsearch --help` and the CLI's
argument checks stay fast and never start a cluster.

- `space`: versioned per-architecture search spaces (package JSON, overridable by file).
- `cluster`: start or join Ray; per-trial resources and concurrency from cluster resources.
- `raytrain`: the Ray Train worker function and `TorchTrainer` construction around `engine.train`.
- `tune`: a study (OptunaSearch TPE + ASHA), resume, best-trial export to best.json/best.ckpt.
- `study_log`: the driver-side Tune callback that writes trials to OUT/events.jsonl and queues
  them for MLflow (`ecgsearch.tracking`, which never blocks Tune's event loop).
"""

"""A checkpoint as an MLflow model users can load and serve: `mlflow.pyfunc.load_model(uri).predict(x)`.

Input: raw mV, float32, shaped (n, leads, samples) in the model's lead order, rate and length
(the signature says which; `metadata` carries leads, rate, length and the normaliser too).
Output: what `ecgsearch predict` prints: per-class probabilities (multi-label tasks), years (age),
or rebuilt mV (reconstruction). The model folder holds the ecgsearch checkpoints themselves
(`artifacts/model.ckpt`, or `seed<i>.ckpt` for a seed ensemble), which `ecgsearch evaluate` and
`predict --checkpoint` read too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

with warnings.catch_warnings():
    # MLflow 3.17's GenAI request types warn about their own type hints when mlflow.pyfunc loads.
    warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType", category=UserWarning)
    import mlflow.pyfunc

log = logging.getLogger("ecgsearch.tracking")
CHAMPION = "champion"    # registry alias of the best model of a study or a search


_QUIET = (".*Add type hints to the `predict` method",     # our input is a tensor: the signature says so
          ".*input example was not provided")             # the signature is given explicitly


@contextlib.contextmanager
def _quiet():
    """MLflow's advice for models built another way, off the user's console: into our log. (Filters
    alone do not hold: MLflow re-enables these warnings inside its own wrappers.)"""
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        warnings.showwarning = lambda message, category, *a, **k: log.debug("mlflow: %s", message)
        yield


# MLflow checks a PythonModel subclass's type hints when the class is created.
with _quiet():
    class ECGModel(mlflow.pyfunc.PythonModel):
        """Loads the bundled checkpoints once; `predict` is `engine.Predictor` on the given array, the
        mean over the checkpoints when there are several (a lead search's seeds: its seed ensemble)."""

        def load_context(self, context) -> None:
            from ecgsearch.engine import Predictor

            keep = (context.model_config or {}).get("keep")
            names = sorted(k for k in context.artifacts if k.startswith("checkpoint"))
            self._predictors = [Predictor(context.artifacts[k], keep=keep) for k in names]

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
            x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
            x = x.astype(np.float32, copy=False)
            return np.mean([p(x) for p in self._predictors], axis=0).astype(np.float32)


def describe(pred) -> dict[str, Any]:
    """What a user needs to feed an `engine.Predictor`: leads, rate, length, units, normaliser, outputs."""
    c = pred.ck
    return {"leads": list(pred.leads), "fs": int(c.fs), "n_samples": int(c.n_samples), "units": "mV",
            "input": f"float32 (n, {len(pred.leads)}, {c.n_samples})", "task": c.cfg.task, "model": c.cfg.model,
            "trained_on_leads": list(c.leads),
            "outputs": list(pred.output_names),
            "normaliser": {"leads": list(c.leads), "mean": [float(v) for v in c.norm.mean],
                           "std": [float(v) for v in c.norm.std]},
            "thresholds": {k: float(v) for k, v in (c.thresholds or {}).items()},
            "val_score": float(c.score), "epoch": int(c.epoch)}


def save_pyfunc(checkpoints, dest: str | Path, keep=None) -> Path:
    """Write `dest` (replaced if present) as an MLflow pyfunc model folder around one checkpoint or
    several (their mean: a seed ensemble of one architecture), optionally on a subset `keep` of
    their leads."""
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from ecgsearch.engine import Predictor

    paths = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    pred = Predictor(paths[0], device="cpu", keep=keep)
    meta = {**describe(pred), "ensemble_of": len(paths)}
    example = np.zeros((1, len(meta["leads"]), pred.ck.n_samples), dtype=np.float32)
    with torch.inference_mode():
        out = pred(example)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for i, path in enumerate(paths):
            # Each artifact keeps its file name: the folder holds plain ecgsearch checkpoints.
            staged = Path(tmp) / (f"seed{i}.ckpt" if len(paths) > 1 else "model.ckpt")
            shutil.copyfile(path, staged)
            artifacts[f"checkpoint{i:02d}" if len(paths) > 1 else "checkpoint"] = str(staged)
        bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        # no "Downloading artifacts" bars on the user's console (MLflow copies artifacts with them)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            with _quiet():
                mlflow.pyfunc.save_model(str(dest), python_model=ECGModel(), artifacts=artifacts,
                                         signature=signature, metadata={"ecgsearch": meta},
                                         model_config={"keep": list(meta["leads"]) if keep is not None else None},
                                         code_paths=[str(Path(__file__).resolve().parents[1])],
                                         pip_requirements=_requirements())
        finally:
            if bar is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    (dest / "ecgsearch.json").write_text(json.dumps(meta, indent=1) + "\n")
    return dest


def _requirements() -> list[str]:
    # What serving imports, pinned to the versions that trained and saved the model.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "scipy", "pandas", "mlflow")]

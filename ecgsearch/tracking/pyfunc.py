"""A checkpoint as an MLflow model users can load and serve: `mlflow.pyfunc.load_model(uri).predict(x)`.

Input: raw mV, float32, shaped (n, leads, samples) in the model's lead order, rate and length
(the signature says which; `metadata` carries leads, rate, length and the normaliser too).
Output: what `ecgsearch predict` prints: per-class probabilities (multi-label tasks), years (age),
or rebuilt mV (reconstruction). The model folder holds the ecgsearch checkpoint itself, so
`ecgsearch evaluate/predict --checkpoint <folder>/artifacts/model.ckpt` reads the same weights.
"""
from __future__ import annotations

import json
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

CHAMPION = "champion"    # registry alias of the best model of a study or a search


class ECGModel(mlflow.pyfunc.PythonModel):
    """Loads the bundled checkpoint once; `predict` is `engine.Predictor` on the given array."""

    def load_context(self, context) -> None:
        from ecgsearch.engine import Predictor

        self._predictor = Predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        return self._predictor(x.astype(np.float32, copy=False))


def describe(ck) -> dict[str, Any]:
    """What a user needs to feed the model: leads, rate, length, units, normaliser, outputs."""
    from ecgsearch.engine import Predictor

    pred = Predictor(ck, device="cpu")
    c = pred.ck
    return {"leads": list(c.leads), "fs": int(c.fs), "n_samples": int(c.n_samples), "units": "mV",
            "input": f"float32 (n, {len(c.leads)}, {c.n_samples})", "task": c.cfg.task, "model": c.cfg.model,
            "outputs": list(pred.output_names),
            "normaliser": {"mean": [float(v) for v in c.norm.mean], "std": [float(v) for v in c.norm.std]},
            "thresholds": {k: float(v) for k, v in (c.thresholds or {}).items()},
            "val_score": float(c.score), "epoch": int(c.epoch)}


def save_pyfunc(checkpoint: str | Path, dest: str | Path) -> Path:
    """Write `dest` (replaced if present) as an MLflow pyfunc model folder around `checkpoint`."""
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from ecgsearch.engine import Predictor, load_checkpoint

    ck = load_checkpoint(checkpoint)
    meta = describe(ck)
    example = np.zeros((1, len(ck.leads), ck.n_samples), dtype=np.float32)
    with torch.inference_mode():
        out = Predictor(ck, device="cpu")(example)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    with tempfile.TemporaryDirectory() as tmp:
        # The artifact keeps its file name, so the folder holds a plain `model.ckpt`.
        staged = Path(tmp) / "model.ckpt"
        shutil.copyfile(checkpoint, staged)
        # code_paths: the model folder carries this package, so it loads where ecgsearch is not installed.
        with warnings.catch_warnings():
            # The signature is given explicitly; MLflow still asks for an input example.
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            mlflow.pyfunc.save_model(str(dest), python_model=ECGModel(), artifacts={"checkpoint": str(staged)},
                                     signature=signature, metadata={"ecgsearch": meta},
                                     code_paths=[str(Path(__file__).resolve().parents[1])],
                                     pip_requirements=_requirements())
    (dest / "ecgsearch.json").write_text(json.dumps(meta, indent=1) + "\n")
    return dest


def _requirements() -> list[str]:
    # What serving imports, pinned to the versions that trained and saved the model.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "scipy", "pandas", "mlflow")]

"""Single-process (and DDP-aware) training engine: config, train, evaluate, checkpoints."""
from ecgsearch.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ecgsearch.engine.config import TrainConfig, apply_overrides
from ecgsearch.engine.evaluate import Predictor, evaluate, predict_records, predict_split
from ecgsearch.engine.train import EpochReport, TrainResult, open_data, train

__all__ = ["Checkpoint", "EpochReport", "TrainConfig", "TrainResult", "apply_overrides", "evaluate",
           "Predictor", "load_checkpoint", "open_data", "predict_records", "predict_split", "save_checkpoint", "train"]

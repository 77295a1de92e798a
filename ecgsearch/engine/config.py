"""Typed training configuration.

One dataclass holds every setting a training needs, so a checkpoint, an MLflow run and
a tuning study can all carry the *resolved* config and rebuild the run exactly.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ecgsearch.leads import LEADS, parse_leads

PRECISIONS = ("auto", "bf16", "fp32")


def _default_splits() -> dict[str, list[int]]:
    return {"train": [1, 2, 3, 4, 5, 6, 7, 8], "val": [9], "test": [10]}


@dataclass
class TrainConfig:
    model: str = "resnet1d_tiny"
    task: str = "rhythm"
    leads: tuple[str, ...] = LEADS
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Ribeiro et al. 2020: ReduceLROnPlateau with factor 0.1, stop when learning stalls.
    lr_factor: float = 0.1
    lr_patience: int = 3
    early_stop_patience: int = 6
    min_lr: float = 1e-7
    seed: int = 0
    precision: str = "auto"
    target_fs: int | None = None
    n_samples: int | None = None
    loss: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, list[int]] = field(default_factory=_default_splits)
    bootstrap: int = 1000
    threads: int | None = None
    # Threads building batches ahead of the step (engine/loader.py); 0 builds each on the loop's
    # own thread; None: 1 where the process has 2+ CPUs, else 0. Never changes a batch or the order.
    loader_threads: int | None = None
    # Superclass task: keep records with no superclass statement (False = the PTB-XL
    # benchmark of Strodthoff et al. 2020, which leaves them out of every split).
    keep_unlabeled: bool = False

    def __post_init__(self) -> None:
        self.leads = parse_leads(self.leads)
        self.splits = {k: [int(f) for f in v] for k, v in self.splits.items()}
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid setting {name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if not 0 < self.lr_factor < 1:
            raise bad("lr_factor", "must be in (0, 1)")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {', '.join(PRECISIONS)}")
        if self.target_fs is not None and int(self.target_fs) <= 0:
            raise bad("target_fs", "must be a positive rate in Hz")
        if self.n_samples is not None and int(self.n_samples) <= 0:
            raise bad("n_samples", "must be positive")
        if self.bootstrap < 0:
            raise bad("bootstrap", "must be >= 0")
        if self.loader_threads is not None and int(self.loader_threads) < 0:
            raise bad("loader_threads", "must be >= 0 (0: batches built on the training loop's thread)")
        if not isinstance(self.keep_unlabeled, bool):
            raise bad("keep_unlabeled", "must be true or false")
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise bad("splits", f"missing split(s) {sorted(missing)}")
        seen: dict[int, str] = {}
        for split, folds in self.splits.items():
            if not folds:
                raise bad("splits", f"split {split!r} has no folds")
            for f in folds:
                if f in seen:
                    raise bad("splits", f"fold {f} is in both {seen[f]!r} and {split!r}")
                seen[f] = split

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["leads"] = list(self.leads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **kw: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **kw})

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A JSON TrainConfig dict, or a wrapper with the dict under "config" (e.g. a study's best.json).

        A name that is not an existing file but names a packaged preset (`ribeiro2020`, see
        `list_presets`) loads that preset; a file of the same name always wins.
        """
        preset = None if Path(path).exists() else _preset_name(path)
        try:
            if preset is not None:
                text = (resources.files("ecgsearch") / "configs" / f"{preset}.json").read_text()
                path = f"preset {preset}"
            else:
                text = Path(path).read_text()
            raw = json.loads(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist and is not a packaged preset "
                                    f"(presets: {', '.join(list_presets()) or 'none'})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
            raw = raw["config"]
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a JSON object of training settings")
        return cls.from_dict(raw)


def list_presets() -> list[str]:
    """Names of the TrainConfig presets packaged in ecgsearch/configs."""
    root = resources.files("ecgsearch") / "configs"
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def _preset_name(path: str | Path) -> str | None:
    """The preset a bare name (`ribeiro2020` or `ribeiro2020.json`) refers to, if any."""
    text = str(path)
    if Path(text).name != text:      # a path with folders is always a file, never a preset
        return None
    name = text[:-5] if text.endswith(".json") else text
    return name if name in list_presets() else None


def coerce_value(text: str) -> Any:
    """Parse a `--set key=value` string: JSON where it parses (numbers, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """Apply `key=value` overrides; `model_kwargs.dropout=0.3` reaches into dict settings."""
    d = cfg.to_dict()
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        key, text = pair.split("=", 1)
        head, _, sub = key.partition(".")
        if head not in d:
            raise ValueError(f"unknown training setting {head!r} in override {pair!r}")
        if sub:
            if not isinstance(d[head], dict):
                raise ValueError(f"setting {head!r} is not a dict; cannot set {key!r}")
            d[head] = {**d[head], sub: coerce_value(text)}
        else:
            d[head] = coerce_value(text)
    return TrainConfig.from_dict(d)

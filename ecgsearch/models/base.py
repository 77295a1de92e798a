"""Shared base for every ecgsearch model: typed configs, input checks, the common interface.

Every architecture is built from a frozen config dataclass. The resolved config is
kept on the model as a plain dict (`model.config`) so that a checkpoint can rebuild
the exact network with `create_model(model.name, **model.config)`; it therefore holds
only ints, floats, bools and tuples of them (safe for `torch.load(weights_only=True)`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

C = TypeVar("C", bound="ModelConfig")


def _is_int(v: Any) -> bool:
    # bool is an int subclass; True as a filter count is always a mistake.
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Settings every model has. Subclasses add architecture settings with defaults."""

    n_leads: int
    num_outputs: int
    n_samples: int

    # ---- validation helpers (each error names the setting) -------------------------
    def _positive_int(self, name: str) -> None:
        v = getattr(self, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"model setting {name}={v!r}: must be a positive integer")

    def _odd_kernel(self, name: str) -> None:
        v = getattr(self, name)
        if not _is_int(v) or v < 1 or v % 2 == 0:
            # Even kernels cannot be centred, so 'same' padding would shift the signal.
            raise ValueError(f"model setting {name}={v!r}: kernel size must be a positive odd integer")

    def _int_tuple(self, name: str, *, odd: bool = False, min_len: int = 1) -> None:
        v = getattr(self, name)
        if not isinstance(v, tuple) or len(v) < min_len or not all(_is_int(e) and e >= 1 for e in v):
            raise ValueError(f"model setting {name}={v!r}: must be a list of at least {min_len} "
                             "positive integers")
        if odd and any(e % 2 == 0 for e in v):
            raise ValueError(f"model setting {name}={v!r}: kernel sizes must be odd")

    def _probability(self, name: str) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"model setting {name}={v!r}: must be a number in [0, 1)")

    def validate(self) -> None:
        """Check every setting; subclasses extend this and call super()."""
        for name in ("n_leads", "num_outputs", "n_samples"):
            self._positive_int(name)
        m = self.sample_multiple()
        if self.n_samples % m:
            raise ValueError(f"model setting n_samples={self.n_samples}: must be divisible by {m} "
                             f"({self.multiple_reason()}); pad or crop to e.g. "
                             f"{math.ceil(self.n_samples / m) * m}")

    def sample_multiple(self) -> int:
        """n_samples must be a multiple of this (product of the downsampling factors)."""
        return 1

    def multiple_reason(self) -> str:
        return "the architecture's total downsampling"

    # ---- construction from keyword overrides ---------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls: type[C], kwargs: Mapping[str, Any], *, validate: bool = True) -> C:
        names = cls.field_names()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown model setting(s) {', '.join(unknown)} for {cls.__name__}; "
                             f"valid settings: {', '.join(names)}")
        # JSON (search spaces, MLflow params) turns tuples into lists; normalise back so the
        # config stays hashable and checkpoint-safe.
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in clean]
        if missing:
            raise ValueError(f"missing model setting(s) {', '.join(missing)} for {cls.__name__}")
        cfg = cls(**clean)
        if validate:
            cfg.validate()
        return cfg


class ECGModel(nn.Module):
    """Common interface: (B, n_leads, n_samples) -> forward_features -> forward_head."""

    default_name: ClassVar[str] = "ecgmodel"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_leads = cfg.n_leads
        self.n_samples = cfg.n_samples
        self.num_outputs = cfg.num_outputs
        # Registry name; create_model overwrites it with the variant name (e.g. *_tiny).
        self.name = self.default_name
        self.num_features = 0  # set by subclasses: size of forward_features' channel axis

    @property
    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.n_leads, self.n_samples)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: expected a torch.Tensor of shape (batch, {self.n_leads}, "
                             f"{self.n_samples}), got {type(x).__name__}")
        if x.dim() != 3 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name}: expected input of shape (batch, n_leads, n_samples) = "
                             f"(B, {self.n_leads}, {self.n_samples}), got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_shape={self.input_shape}, num_outputs={self.num_outputs}"


class Variant:
    """A registered factory: an architecture class plus the defaults of one named size.

    `resnet1d` and `resnet1d_tiny` are two Variants of the same class, so the small
    model exercises exactly the code the full one runs.
    """

    def __init__(self, model_cls: Callable[[Any], ECGModel], config_cls: type[ModelConfig],
                 **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(config_cls.field_names()))
        if unknown:
            raise ValueError(f"variant defaults name unknown setting(s) {', '.join(unknown)}")
        self.model_cls = model_cls
        self.config_cls = config_cls
        self.defaults = dict(defaults)

    def resolve(self, kwargs: Mapping[str, Any], *, validate: bool = True) -> ModelConfig:
        return self.config_cls.from_kwargs({**self.defaults, **kwargs}, validate=validate)

    def __call__(self, **kwargs: Any) -> ECGModel:
        return self.model_cls(self.resolve(kwargs))

    def sample_multiple(self, **kwargs: Any) -> int:
        """The n_samples multiple this variant needs, before n_samples is known."""
        placeholders = {"n_leads": 1, "num_outputs": 1, "n_samples": 1}
        cfg = self.resolve({**placeholders, **kwargs}, validate=False)
        return cfg.sample_multiple()

"""Name -> factory registry. Names are exact: no prefix matching, no case folding,
so a typo in a search space fails loudly instead of training some other model."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import ECGModel

Factory = Callable[..., ECGModel]


class ModelRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def names(self) -> list[str]:
        return sorted(self._factories)

    def _known(self) -> str:
        return ", ".join(self.names()) or "(none)"

    def register(self, name: str) -> Callable[[Factory], Factory]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty string, got {name!r}")

        def deco(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"model {name!r} is already registered; known models: {self._known()}")
            if not callable(factory):
                raise ValueError(f"factory for model {name!r} is not callable: {factory!r}")
            self._factories[name] = factory
            return factory

        return deco

    def factory(self, name: str) -> Factory:
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(f"unknown model {name!r}; known models: {self._known()}") from None

    def create(self, name: str, *, n_leads: int = 12, num_outputs: int, n_samples: int,
               **overrides: Any) -> ECGModel:
        model = self.factory(name)(n_leads=n_leads, num_outputs=num_outputs, n_samples=n_samples,
                                   **overrides)
        if not isinstance(model, ECGModel):
            raise ValueError(f"factory for model {name!r} returned {type(model).__name__}, "
                             "not an ECGModel")
        model.name = name
        return model

    def sample_multiple(self, name: str, **overrides: Any) -> int:
        fn = getattr(self.factory(name), "sample_multiple", None)
        return int(fn(**overrides)) if fn is not None else 1


REGISTRY = ModelRegistry()


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator/function: `register_model("name")(factory)`; duplicates are an error."""
    return REGISTRY.register(name)


def create_model(name: str, *, n_leads: int = 12, num_outputs: int, n_samples: int,
                 **overrides: Any) -> ECGModel:
    """Build a registered model. `overrides` are architecture settings (kernel_size, dropout,
    filters, lead_dropout, ...); unknown ones raise ValueError naming them."""
    return REGISTRY.create(name, n_leads=n_leads, num_outputs=num_outputs, n_samples=n_samples,
                           **overrides)


def list_models() -> list[str]:
    return REGISTRY.names()


def sample_multiple(name: str, **overrides: Any) -> int:
    """The multiple n_samples must be for this model and settings (engine pads up to it)."""
    return REGISTRY.sample_multiple(name, **overrides)

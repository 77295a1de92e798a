"""Search spaces: versioned JSON files, one per architecture family, overridable by file.

A file looks like::

    {"format": "ecgsearch.search_space/1", "name": "resnet1d", "version": 1,
     "models": ["resnet1d", "resnet1d_tiny"],
     "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
                "model_kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
                "model_kwargs.filters": {"type": "choice",
                                         "options": {"narrow": [32, 64], "wide": [64, 128]}}}}

A parameter name is a `TrainConfig` field (`lr`, `batch_size`, ...) or `model_kwargs.<setting>` /
`loss.<setting>`. Types: `uniform` and `loguniform` (floats), `int` (inclusive bounds, optional
`log` and `step`), `choice` (`values`: a list of scalars, or `options`: label -> any JSON value).
`options` exists because Optuna only stores scalar categories: Tune and Optuna see the label,
and `apply_params` swaps in the value (e.g. a tuple of filter widths).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

FORMAT = "ecgsearch.search_space/1"
TYPES = ("uniform", "loguniform", "int", "choice")
# TrainConfig fields a study may tune. The rest (task, leads, epochs, splits, seed, ...) define the
# experiment itself and are fixed by the command line.
TUNABLE_FIELDS = ("lr", "weight_decay", "batch_size", "lr_factor", "lr_patience", "early_stop_patience",
                  "min_lr", "target_fs", "n_samples")
DICT_FIELDS = ("model_kwargs", "loss")
_SPEC_KEYS = {"uniform": {"low", "high"}, "loguniform": {"low", "high"},
              "int": {"low", "high", "log", "step"}, "choice": {"values", "options"}}
_SCALAR = (str, int, float, bool)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    values: tuple | None = None          # choice over scalars
    options: dict | None = None          # choice over labelled JSON values

    def labels(self) -> list:
        return list(self.options) if self.options is not None else list(self.values or ())

    def decode(self, sampled: Any) -> Any:
        """The config value for a sampled value (labels become their option; ints stay ints)."""
        if self.type == "choice":
            if self.options is not None:
                if sampled not in self.options:
                    raise ValueError(f"search parameter {self.name}: {sampled!r} is not one of the "
                                     f"options {', '.join(map(str, self.options))}")
                return self.options[sampled]
            return sampled.item() if hasattr(sampled, "item") else sampled
        if self.type == "int":
            return int(sampled)
        return float(sampled)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    version: int
    models: tuple[str, ...]
    params: dict[str, ParamSpec]
    source: str                          # file path or "package:<name>.json"
    digest: str                          # sha256 of the file text: pins the exact space in MLflow
    text: str = dataclasses.field(repr=False, default="")  # the file text (what trials re-parse)

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune domains keyed by parameter name (OptunaSearch converts them to TPE distributions)."""
        from ray import tune

        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if p.type == "uniform":
                out[name] = tune.uniform(p.low, p.high)
            elif p.type == "loguniform":
                out[name] = tune.loguniform(p.low, p.high)
            elif p.type == "int":
                lo, hi = int(p.low), int(p.high)
                if p.step:
                    out[name] = (tune.qlograndint if p.log else tune.qrandint)(lo, hi, p.step)
                else:  # randint's upper bound is exclusive; ours is inclusive
                    out[name] = (tune.lograndint if p.log else tune.randint)(lo, hi + 1)
            else:
                out[name] = tune.choice(p.labels())
        return out

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(sampled) - set(self.params))
        if unknown:
            raise ValueError(f"search space {self.label} has no parameter(s) {', '.join(unknown)}")
        return {k: self.params[k].decode(v) for k, v in sampled.items()}


def _fail(source: str, what: str) -> ValueError:
    return ValueError(f"search space {source}: {what}")


def _parse_param(source: str, name: str, raw: Any) -> ParamSpec:
    if not isinstance(raw, dict):
        raise _fail(source, f"parameter {name!r} must be an object with a 'type', got {raw!r}")
    kind = raw.get("type")
    if kind not in TYPES:
        raise _fail(source, f"parameter {name!r} has type {kind!r}; choose one of {', '.join(TYPES)}")
    extra = sorted(set(raw) - _SPEC_KEYS[kind] - {"type"})
    if extra:
        raise _fail(source, f"parameter {name!r} ({kind}) has unknown key(s) {', '.join(extra)}")
    if kind == "choice":
        values, options = raw.get("values"), raw.get("options")
        if (values is None) == (options is None):
            raise _fail(source, f"choice parameter {name!r} needs exactly one of 'values' or 'options'")
        if values is not None:
            if not isinstance(values, list) or not values:
                raise _fail(source, f"choice parameter {name!r}: 'values' must be a non-empty list")
            bad = [v for v in values if not isinstance(v, _SCALAR)]
            if bad:
                raise _fail(source, f"choice parameter {name!r}: values {bad} are not scalars; "
                                    "use 'options' (label -> value) for lists or objects")
            if len(set(map(json.dumps, values))) != len(values):
                raise _fail(source, f"choice parameter {name!r} lists a value more than once")
            return ParamSpec(name, kind, values=tuple(values))
        if not isinstance(options, dict) or not options:
            raise _fail(source, f"choice parameter {name!r}: 'options' must be a non-empty object")
        return ParamSpec(name, kind, options=dict(options))
    low, high = raw.get("low"), raw.get("high")
    for key, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(source, f"parameter {name!r}: '{key}' must be a finite number, got {v!r}")
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise _fail(source, f"int parameter {name!r}: bounds {low}..{high} must be whole numbers")
        if low > high:
            raise _fail(source, f"int parameter {name!r}: low={low} is above high={high}")
        step, log = raw.get("step"), bool(raw.get("log", False))
        if step is not None and (not isinstance(step, int) or step < 1):
            raise _fail(source, f"int parameter {name!r}: step must be a positive integer, got {step!r}")
        if log and low < 1:
            raise _fail(source, f"int parameter {name!r}: log scale needs low >= 1, got {low}")
        return ParamSpec(name, kind, low=int(low), high=int(high), log=log, step=step)
    if not low < high:
        raise _fail(source, f"parameter {name!r}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise _fail(source, f"loguniform parameter {name!r}: low must be > 0, got {low}")
    return ParamSpec(name, kind, low=float(low), high=float(high), log=kind == "loguniform")


def _check_name(source: str, name: str) -> None:
    head, dot, sub = name.partition(".")
    if dot:
        if head not in DICT_FIELDS or not sub:
            raise _fail(source, f"parameter {name!r}: dotted names must be model_kwargs.<setting> "
                                "or loss.<setting>")
    elif name not in TUNABLE_FIELDS:
        raise _fail(source, f"parameter {name!r} is not a tunable training setting; tunable: "
                            f"{', '.join(TUNABLE_FIELDS)}, model_kwargs.<setting>, loss.<setting>")


def parse_space(text: str, source: str) -> SearchSpace:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _fail(source, "must hold a JSON object")
    if raw.get("format") != FORMAT:
        raise _fail(source, f"'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    extra = sorted(set(raw) - {"format", "name", "version", "models", "params", "description"})
    if extra:
        raise _fail(source, f"unknown top-level key(s) {', '.join(extra)}")
    name, version, models = raw.get("name"), raw.get("version"), raw.get("models", [])
    if not isinstance(name, str) or not name:
        raise _fail(source, "'name' must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(source, f"'version' must be a positive integer, got {version!r}")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise _fail(source, "'models' must be a list of model names")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(source, "'params' must be a non-empty object")
    specs = {}
    for pname, spec in params.items():
        _check_name(source, pname)
        specs[pname] = _parse_param(source, pname, spec)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return SearchSpace(name, version, tuple(models), specs, source, digest, text)


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space file {path} does not exist")
    return parse_space(path.read_text(), str(path))


def packaged_spaces() -> dict[str, str]:
    """name -> JSON text of every search space shipped in ecgsearch/search_spaces."""
    root = resources.files("ecgsearch") / "search_spaces"
    return {p.name[:-5]: p.read_text() for p in root.iterdir() if p.name.endswith(".json")}


def space_for_model(model: str, override: str | Path | None = None) -> SearchSpace:
    """The override file when given, else the packaged space whose `models` lists `model`."""
    if override is not None:
        space = load_space(override)
    else:
        found = [parse_space(text, f"package:{name}.json") for name, text in sorted(packaged_spaces().items())]
        found = [s for s in found if model in s.models]
        if not found:
            raise ValueError(f"no packaged search space covers model {model!r}; pass --search-space FILE")
        space = found[0]
    if space.models and model not in space.models:
        raise ValueError(f"search space {space.source} is for model(s) {', '.join(space.models)}, "
                         f"not {model!r}")
    return space


def apply_params(cfg, params: dict[str, Any]):
    """A new TrainConfig with decoded parameter values set (dotted names reach into dict fields)."""
    d = cfg.to_dict()
    for name, value in params.items():
        head, dot, sub = name.partition(".")
        if dot:
            d[head] = {**d[head], sub: value}
        else:
            d[head] = value
    return type(cfg).from_dict(d)


def check_space_against_model(space: SearchSpace, base_cfg) -> None:
    """Build the model once per choice value (others at their low end) so a setting the
    architecture does not accept fails here, before any trial starts, naming the parameter."""
    from ecgsearch.models import create_model, sample_multiple

    def corner(p: ParamSpec) -> Any:
        return p.decode(p.labels()[0]) if p.type == "choice" else p.decode(p.low)

    base = {n: corner(p) for n, p in space.params.items()}
    probes = [base] + [{**base, n: p.decode(lab)} for n, p in space.params.items()
                       if p.type == "choice" for lab in p.labels()[1:]]
    for probe in probes:
        try:
            cfg = apply_params(base_cfg, probe)
            kw = dict(cfg.model_kwargs)
            mult = sample_multiple(cfg.model, **kw)
            create_model(cfg.model, n_leads=len(cfg.leads), num_outputs=2,
                         n_samples=mult * max(1, math.ceil(1024 / mult)), **kw)
        except (ValueError, TypeError) as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in probe.items())
            raise ValueError(f"search space {space.source} does not fit model {base_cfg.model!r} "
                             f"at {shown}: {exc}") from None


def space_summary(space: SearchSpace) -> dict[str, Any]:
    """JSON-able description for logs and best.json."""
    return {"name": space.name, "version": space.version, "source": space.source, "sha256": space.digest,
            "params": {n: {k: v for k, v in dataclasses.asdict(p).items()
                           if v is not None and v is not False and k != "name"}
                       for n, p in space.params.items()}}

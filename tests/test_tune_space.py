"""Search spaces: packaged files parse, fit their models, map to Tune domains; bad files fail clearly."""
from __future__ import annotations

import json

import pytest

from ecgsearch.distributed.space import (FORMAT, apply_params, check_space_against_model, load_space,
                                         packaged_spaces, parse_space, space_for_model)
from ecgsearch.engine import TrainConfig


def _write(tmp_path, params, **top):
    doc = {"format": FORMAT, "name": "t", "version": 1, "models": ["resnet1d_tiny"], "params": params, **top}
    p = tmp_path / "space.json"
    p.write_text(json.dumps(doc))
    return p


def test_every_packaged_space_parses_fits_its_models_and_samples_in_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer

    texts = packaged_spaces()
    assert {"resnet1d", "resnet1d_tiny", "mlresnet", "mlresnet_tiny", "uresnet", "uresnet_tiny"} <= set(texts)
    for name, text in texts.items():
        space = parse_space(text, name)
        assert space.models, f"{name} lists no models"
        for model in space.models:
            task = "reconstruct" if model.startswith("uresnet") else "rhythm"
            leads = ("I", "II", "V2") if task == "reconstruct" else None
            base = TrainConfig(model=model, task=task, **({"leads": leads} if leads else {}))
            check_space_against_model(space, base)  # raises if any choice does not build
            assert space_for_model(model).name == space.name
        domains = space.to_tune()
        assert set(domains) == set(space.params)
        for pname, dom in domains.items():
            p = space.params[pname]
            for _ in range(20):
                v = dom.sample()
                if p.type == "choice":
                    assert isinstance(dom, Categorical) and v in p.labels()
                else:
                    assert isinstance(dom, Integer if p.type == "int" else Float)
                    assert p.low <= v <= p.high, (name, pname, v)


def test_ml_resnet_space_tunes_lead_dropout_and_options_decode_to_lists():
    space = space_for_model("mlresnet")
    assert "model_kwargs.lead_dropout" in space.params
    sampled = {"lr": 1e-3, "model_kwargs.filters": "x2", "batch_size": 64}
    decoded = space.decode(sampled)
    assert decoded["model_kwargs.filters"] == [64, 128, 256] and decoded["batch_size"] == 64
    cfg = apply_params(TrainConfig(model="mlresnet", model_kwargs={"stem_stride": 2}), decoded)
    assert cfg.lr == 1e-3 and cfg.batch_size == 64
    # Dotted names merge into model_kwargs instead of replacing it.
    assert cfg.model_kwargs == {"stem_stride": 2, "filters": [64, 128, 256]}
    with pytest.raises(ValueError, match="'x3' is not one of the options"):
        space.decode({"model_kwargs.filters": "x3"})
    with pytest.raises(ValueError, match="has no parameter.*colour"):
        space.decode({"colour": 1})


@pytest.mark.parametrize("params, message", [
    ({"lr": {"type": "gaussian", "low": 0, "high": 1}}, "type 'gaussian'"),
    ({"lr": {"type": "loguniform", "low": 0.0, "high": 1e-2}}, "low must be > 0"),
    ({"lr": {"type": "uniform", "low": 0.1, "high": 0.1}}, "must be below high"),
    ({"lr": {"type": "uniform", "low": 0.1, "high": 1, "scale": 2}}, "unknown key.*scale"),
    ({"epochs": {"type": "int", "low": 1, "high": 5}}, "'epochs' is not a tunable"),
    ({"optim.beta": {"type": "uniform", "low": 0, "high": 1}}, "dotted names must be"),
    ({"batch_size": {"type": "int", "low": 8.5, "high": 64}}, "must be whole numbers"),
    ({"batch_size": {"type": "int", "low": 0, "high": 64, "log": True}}, "log scale needs low >= 1"),
    ({"model_kwargs.filters": {"type": "choice", "values": [[16, 32], [32, 64]]}}, "use 'options'"),
    ({"batch_size": {"type": "choice", "values": [32, 32]}}, "more than once"),
    ({"batch_size": {"type": "choice", "values": [32], "options": {"a": 1}}}, "exactly one of"),
    ({}, "'params' must be a non-empty object"),
])
def test_bad_space_files_fail_naming_file_and_parameter(tmp_path, params, message):
    path = _write(tmp_path, params)
    with pytest.raises(ValueError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_bad_top_level_and_wrong_model(tmp_path):
    ok = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    with pytest.raises(ValueError, match="'format' must be"):
        load_space(_write(tmp_path, ok, format="v0"))
    with pytest.raises(ValueError, match="'version' must be a positive integer"):
        load_space(_write(tmp_path, ok, version="1"))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        load_space(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_space(tmp_path / "nope.json")
    path = _write(tmp_path, ok)
    with pytest.raises(ValueError, match=r"is for model\(s\) resnet1d_tiny, not 'mlresnet'"):
        space_for_model("mlresnet", path)
    assert space_for_model("resnet1d_tiny", path).source == str(path)
    with pytest.raises(ValueError, match="no packaged search space covers model 'lstm'"):
        space_for_model("lstm")


def test_space_that_the_architecture_rejects_fails_before_any_trial(tmp_path):
    path = _write(tmp_path, {"model_kwargs.width": {"type": "choice", "values": [8, 16]}})
    with pytest.raises(ValueError, match="does not fit model 'resnet1d_tiny'.*width"):
        check_space_against_model(load_space(path), TrainConfig(model="resnet1d_tiny"))
    # An even kernel is refused by the model: found at the probe of that choice value, not at trial time.
    path = _write(tmp_path, {"model_kwargs.kernel_size": {"type": "choice", "values": [9, 8]}})
    with pytest.raises(ValueError, match="model_kwargs.kernel_size=8"):
        check_space_against_model(load_space(path), TrainConfig(model="resnet1d_tiny"))

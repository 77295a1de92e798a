"""Model registry and architectures: interface, shapes, gradients, configs, ML-ResNet subsets."""
from __future__ import annotations

import ast
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgsearch.leads import LEADS, lead_indices, parse_leads
from ecgsearch.models import (MLResNet, ModelRegistry, ResNet1d, Variant, create_model,
                              list_models, register_model, sample_multiple)
from ecgsearch.models.resnet1d import ResNet1dConfig

EXPECTED = {"resnet1d", "resnet1d_tiny", "mlresnet", "mlresnet_tiny", "uresnet", "uresnet_tiny"}


def outputs_for(name: str) -> int:
    # U-ResNet reconstructs all twelve leads; classifiers here get 6 outputs (rhythm codes).
    return len(LEADS) if name.startswith("uresnet") else 6


def build(name: str, *, n_leads: int = 12, n_samples: int | None = None, **kw) -> torch.nn.Module:
    n_samples = n_samples or 2 * sample_multiple(name, **kw)
    kw.setdefault("num_outputs", outputs_for(name))
    return create_model(name, n_leads=n_leads, n_samples=n_samples, **kw)


def expected_out(name: str, b: int, n_samples: int) -> tuple[int, ...]:
    return (b, len(LEADS), n_samples) if name.startswith("uresnet") else (b, 6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_holds_exactly_the_six_architectures():
    assert set(list_models()) == EXPECTED
    assert list_models() == sorted(list_models())


# ---- every registered model -----------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_reaches_every_parameter(name):
    """100 Hz-style input (12 x 1024): right shapes, finite values, every parameter gets a gradient."""
    b = 2 if "tiny" not in name else 4  # full-size models run too, on a smaller batch
    model = build(name, n_samples=1024).train()
    x = torch.randn(b, 12, 1024)
    f = model.forward_features(x)
    feat_shape = (b, model.num_features, 1024) if name.startswith("uresnet") else (b, model.num_features)
    assert tuple(f.shape) == feat_shape
    y = model(x)
    assert tuple(y.shape) == expected_out(name, b, 1024)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{name}: no gradient reached {missing}"
    assert model.input_shape == (12, 1024) and model.name == name


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("n_leads", [1, 3, 12])
def test_any_lead_count_builds_and_runs(name, n_leads):
    n = sample_multiple(name)  # the shortest legal input keeps the full-size models cheap here
    model = build(name, n_leads=n_leads, n_samples=n).eval()
    with torch.no_grad():
        y = model(torch.randn(2, n_leads, n))
    assert tuple(y.shape) == expected_out(name, 2, n)
    assert torch.isfinite(y).all()
    assert model.input_shape == (n_leads, n) and model.config["n_leads"] == n_leads


@pytest.mark.parametrize("name", list_models())
def test_wrong_input_shape_names_expected_and_got(name):
    n = sample_multiple(name)
    model = build(name, n_leads=3, n_samples=n)
    with pytest.raises(ValueError, match=rf"\(B, 3, {n}\).*got \(2, 12, {n}\)"):
        model(torch.randn(2, 12, n))
    with pytest.raises(ValueError, match=rf"\(B, 3, {n}\).*got \(2, 3, {2 * n}\)"):
        model(torch.randn(2, 3, 2 * n))
    with pytest.raises(ValueError, match=rf"got \(3, {n}\)"):
        model(torch.randn(3, n))


@pytest.mark.parametrize("name", list_models())
def test_config_round_trip_rebuilds_the_same_model(name, tmp_path):
    extra = {"dropout": 0.1}
    model = build(name, n_leads=3, **extra).eval()
    n = model.n_samples
    # Through a weights_only checkpoint and through JSON (which turns tuples into lists).
    torch.save({"config": model.config, "state": model.state_dict()}, tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    for cfg in (ckpt["config"], json.loads(json.dumps(model.config))):
        twin = create_model(name, **cfg).eval()
        assert twin.config == model.config and twin.name == name
        assert twin.config["dropout"] == 0.1 and twin.config["n_leads"] == 3
        assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())
        twin.load_state_dict(ckpt["state"])
        x = torch.randn(2, 3, n)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x))


@pytest.mark.parametrize("name", sorted(n for n in list_models() if n.endswith("_tiny")))
def test_tiny_models_train_under_bf16_autocast(name):
    """The engine trains with bf16 autocast on CPU; forward and backward must stay finite."""
    model = build(name, n_samples=1024).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(8, 12, 1024))
        loss = y.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- registry errors ------------------------------------------------------------------------
def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'") as err:
        create_model("resnet", num_outputs=6, n_samples=1024)
    assert all(n in str(err.value) for n in EXPECTED)
    with pytest.raises(ValueError, match="known models"):
        sample_multiple("ResNet1d")  # exact names only: no case folding


def test_duplicate_registration_is_refused_and_leaves_registry_intact():
    before = list_models()
    with pytest.raises(ValueError, match="already registered") as err:
        register_model("resnet1d")(Variant(ResNet1d, ResNet1dConfig, kernel_size=3))
    assert all(n in str(err.value) for n in EXPECTED)
    assert list_models() == before
    assert build("resnet1d", n_samples=256).cfg.kernel_size == 17  # the original factory survived


def test_private_registry_registers_and_names_models():
    reg = ModelRegistry()
    reg.register("small_resnet")(Variant(ResNet1d, ResNet1dConfig, filters=(8,), downsample=(2,),
                                         kernel_size=3))
    m = reg.create("small_resnet", n_leads=2, num_outputs=3, n_samples=8)
    assert m.name == "small_resnet" and reg.sample_multiple("small_resnet") == 2
    assert m(torch.randn(4, 2, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match="known models: small_resnet"):
        reg.create("resnet1d", num_outputs=1, n_samples=8)


@pytest.mark.parametrize("name, overrides, setting", [
    ("resnet1d_tiny", {"kernel_size": 8}, "kernel_size=8"),
    ("resnet1d_tiny", {"n_samples": 1000}, r"n_samples=1000: must be divisible by 256.*1024"),
    ("resnet1d", {"filters": (64, 128)}, "filters=.*downsample="),
    ("resnet1d_tiny", {"bogus": 1, "kernal_size": 9}, "bogus, kernal_size"),
    ("resnet1d_tiny", {"dropout": 1.0}, "dropout=1.0"),
    ("mlresnet_tiny", {"kernels": (9, 6, 5)}, "kernels=.*odd"),
    ("mlresnet_tiny", {"lead_dropout": 1.0}, "lead_dropout=1.0"),
    ("mlresnet_tiny", {"n_samples": 96}, "n_samples=96: must be divisible by 64"),
    ("mlresnet", {"n_leads": 0}, "n_leads=0"),
    ("uresnet_tiny", {"n_samples": 1026}, r"n_samples=1026: must be divisible by 4 \(2\*\*depth"),
    ("uresnet_tiny", {"depth": 0}, "depth=0"),
    ("uresnet", {"num_outputs": 0}, "num_outputs=0"),
])
def test_bad_settings_raise_naming_the_setting(name, overrides, setting):
    kw = {"n_leads": 12, "num_outputs": outputs_for(name), "n_samples": 1024, **overrides}
    with pytest.raises(ValueError, match=setting):
        create_model(name, **kw)


def test_sample_multiples_follow_the_downsampling():
    assert sample_multiple("resnet1d") == 4 ** 4
    assert sample_multiple("resnet1d", downsample=(1, 2, 2, 2, 2)) == 16
    assert sample_multiple("uresnet") == 2 ** 4 and sample_multiple("uresnet", depth=3) == 8
    assert sample_multiple("mlresnet") == 4 ** 3 and sample_multiple("mlresnet_tiny") == 4 * 16


# ---- ResNet-1d (Ribeiro et al. 2020) ---------------------------------------------------------
def test_resnet1d_matches_reference_parameter_count_and_schedule():
    model = create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=4096, kernel_size=17).eval()
    assert sum(p.numel() for p in model.parameters()) == 6_950_310
    # The reference's extra full-resolution 64->64 unit accounts for 2*64*64*17 + 2*2*64 of them.
    assert sum(p.numel() for p in model.units[0].parameters()) == 139_520
    shapes = []
    # (channels, samples): on the CPU the units run on (B, C, 1, L) channels-last tensors
    hooks = [u.register_forward_hook(lambda m, i, o: shapes.append((o[0].shape[1], o[0].shape[-1])))
             for u in model.units]
    with torch.no_grad():
        model(torch.randn(1, 12, 4096))
    for h in hooks:
        h.remove()
    assert shapes == [(64, 4096), (128, 1024), (196, 256), (256, 64), (320, 16)]
    assert build("resnet1d", n_samples=1024).num_features == 320 * 4  # 100 Hz: 1024 -> ... -> 4


# ---- ML-ResNet --------------------------------------------------------------------------------
def _trained_mlresnet(name: str, n_samples: int) -> MLResNet:
    """A model whose BN running stats are no longer the trivial 0/1 (so slicing errors show)."""
    model = build(name, n_samples=n_samples).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 12, n_samples) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["mlresnet", "mlresnet_tiny"])
def test_mlresnet_subset_equals_model_built_for_subset(name):
    n = sample_multiple(name)
    model = _trained_mlresnet(name, n)
    x = torch.randn(3, 12, n)
    idx = lead_indices(parse_leads("I,AVR,V2,V6"))
    mask = torch.zeros(12, dtype=torch.bool)
    mask[idx] = True
    sub = model.select_leads(idx)
    assert sub.n_leads == 4 and sub.name == name and not sub.training
    x_nan = x.clone()
    x_nan[:, ~mask] = float("nan")  # masked branches must not be computed at all
    with torch.no_grad():
        masked = model(x_nan, lead_mask=mask)
        torch.testing.assert_close(masked, sub(x[:, idx]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked, model(x), atol=1e-4)  # the mask really changed the output
        # Lead order within the sub-model does not matter (fusion is a mean), and a list mask works.
        rev = model.select_leads(idx[::-1])
        torch.testing.assert_close(rev(x[:, idx[::-1]]), masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, lead_mask=mask.tolist()), masked)
    # The sub-model rebuilds from its own config like any checkpointed model.
    assert create_model(name, **sub.config).n_leads == 4


def test_mlresnet_fusion_is_a_mean_over_present_branches():
    """Identical branches on identical leads: any subset gives the full output (scale is kept)."""
    model = _trained_mlresnet("mlresnet_tiny", sample_multiple("mlresnet_tiny"))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dim() >= 1 and v.shape[0] == 12 and not k.startswith("head"):
                v.copy_(v[:1].expand_as(v))  # every lead's slice := lead 0's
        x = torch.randn(2, 1, model.n_samples).expand(2, 12, model.n_samples).contiguous()
        full = model(x)
        for keep in ([0], [3, 7], list(range(9))):
            mask = torch.zeros(12, dtype=torch.bool)
            mask[keep] = True
            torch.testing.assert_close(model(x, lead_mask=mask), full, rtol=1e-5, atol=1e-5)


def test_mlresnet_subset_training_touches_only_present_branches():
    model = build("mlresnet_tiny").train()
    mask = torch.tensor([True, False] * 6)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 12, model.n_samples) + 1.0, lead_mask=mask).square().mean().backward()
    for k, v in model.state_dict().items():
        if "running_mean" in k:
            assert (v[mask] != before[k][mask]).any(), k
            torch.testing.assert_close(v[~mask], before[k][~mask])
    for n, p in model.named_parameters():
        if p.dim() >= 2 and p.shape[0] == 12 and not n.startswith("head"):
            per_lead = p.grad.flatten(1).abs().sum(1)
            assert (per_lead[mask] > 0).all() and (per_lead[~mask] == 0).all(), n


def test_mlresnet_bad_masks_and_indices():
    model = build("mlresnet_tiny")
    x = torch.randn(2, 12, model.n_samples)
    with pytest.raises(ValueError, match="at least one must be present"):
        model(x, lead_mask=[False] * 12)
    with pytest.raises(ValueError, match="length n_leads=12"):
        model(x, lead_mask=[True] * 11)
    with pytest.raises(ValueError, match="distinct lead indices in"):
        model.select_leads([0, 0])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        model.select_leads([12])


def test_lead_dropout_never_drops_all_and_is_off_in_eval():
    model = build("mlresnet_tiny", lead_dropout=0.9).train()
    x = torch.randn(2, 12, model.n_samples)
    present = torch.tensor([True] * 6 + [False] * 6)
    kept = []
    with torch.no_grad():
        for _ in range(150):
            model(x, lead_mask=present)
            m = model.last_lead_mask
            assert m.any() and not (m & ~present).any()
            kept.append(int(m.sum()))
    # ~0.9 of branches dropped: usually one or two survive, but not always the same count.
    assert np.mean(kept) < 2.5 and len(set(kept)) > 1
    solo = build("mlresnet_tiny", n_leads=1, lead_dropout=0.9).train()
    for _ in range(20):
        solo(torch.randn(2, 1, solo.n_samples))
        assert solo.last_lead_mask.tolist() == [True]
    # Eval: every branch is used and the output equals the same weights without lead dropout.
    model.eval()
    plain = build("mlresnet_tiny", lead_dropout=0.0).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    assert model.last_lead_mask.all()


# ---- real PTB-XL records ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def ptbxl_batch():
    root = os.environ.get("ECGSEARCH_PTBXL_SAMPLE")
    if not root:
        pytest.skip("ECGSEARCH_PTBXL_SAMPLE is not set (point it at the PTB-XL sample folder)")
    import pandas as pd

    with warnings.catch_warnings():
        # wfdb 4.3 calls DataFrame.set_index(inplace=True), deprecated in pandas 3.1 (not our code).
        warnings.filterwarnings("ignore", category=pd.errors.Pandas4Warning)
        import wfdb

        db = pd.read_csv(Path(root) / "ptbxl_database.csv", index_col="ecg_id").head(32)
        sig = np.stack([wfdb.rdsamp(str(Path(root) / p))[0].T for p in db["filename_lr"]])
    x = np.zeros((len(db), 12, 1024), np.float32)
    x[:, :, 12:1012] = sig  # centred zero-padding 1000 -> 1024
    norm = [float("NORM" in ast.literal_eval(s)) for s in db["scp_codes"]]
    return torch.from_numpy(x), torch.tensor(norm)


@pytest.mark.parametrize("name", sorted(n for n in list_models() if n.endswith("_tiny")))
def test_tiny_models_fit_real_ecgs(name, ptbxl_batch):
    """A few Adam steps on 32 real records must cut the training loss: gradients are useful."""
    x, norm = ptbxl_batch
    if name.startswith("uresnet"):  # reconstruct all 12 leads from I, II, V2
        idx = lead_indices(parse_leads("I,II,V2"))
        model, inp = build(name, n_leads=3, n_samples=1024), x[:, idx]

        def loss_fn(y):
            return (y - x).square().mean()
    else:
        model, inp = build(name, n_samples=1024, num_outputs=1), x

        def loss_fn(y):
            return torch.nn.functional.binary_cross_entropy_with_logits(y[:, 0], norm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = loss_fn(model(inp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses

"""The engine's CPU speed-ups change how, not what: the cheap dropout mask and resnet1d's
channels-last path must compute what torch's own dropout and the Conv1d modules compute."""
import pytest
import torch
import torch.nn.functional as F

from ecgsearch.models import create_model
from ecgsearch.models.layers import Dropout, dropout, keep_mask


def test_keep_mask_rate_and_expectation():
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    out = dropout(x, 0.2, True)
    kept = (out != 0).float().mean().item()
    # 400,000 draws: the kept fraction's standard error is 0.0006
    assert abs(kept - 0.8) < 0.003
    # survivors scaled by the inverse of the quantised keep rate: the mean is preserved
    assert abs(out.mean().item() - 1.0) < 0.005
    values = torch.unique(out).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(65536 / (65536 - 13107))


def test_mask_words_use_all_bits():
    # every 16-bit lane of a 64-bit word must be uniform, including the top one's sign bit
    torch.manual_seed(1)
    keep, _ = keep_mask((200_000, 4), 0.5, torch.device("cpu"))
    assert torch.allclose(keep.float().mean(0), torch.full((4,), 0.5), atol=0.01)


def test_dropout_is_seeded_identity_in_eval_and_keeps_layout():
    x = torch.randn(8, 16, 1, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    a = dropout(x, 0.3, True)
    torch.manual_seed(3)
    b = dropout(x, 0.3, True)
    assert torch.equal(a, b)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert dropout(x, 0.3, False) is x
    assert Dropout(0.3).eval()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_dropout_gradient_is_the_mask_times_scale():
    torch.manual_seed(4)
    x = torch.randn(32, 50, requires_grad=True)
    out = dropout(x, 0.25, True)
    out.sum().backward()
    ratio = torch.where(x.detach() != 0, out.detach() / x.detach(), torch.zeros(()))
    assert torch.allclose(x.grad, ratio, atol=1e-6)


def _conv1d_features(model, x):
    """resnet1d run through its Conv1d/BatchNorm1d modules on (B, C, L) tensors."""
    h = model.stem(x)
    y = h
    for unit in model.units:
        h, y = unit(h, y)
    return h.flatten(1)


@pytest.mark.parametrize("name", ["resnet1d", "resnet1d_tiny"])
def test_resnet1d_channels_last_path_equals_conv1d_path(name):
    torch.manual_seed(0)
    model = create_model(name, n_leads=12, num_outputs=3, n_samples=1024)
    twin = create_model(name, n_leads=12, num_outputs=3, n_samples=1024)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(6, 12, 1024)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin.head(_conv1d_features(twin, x)), rtol=1e-4, atol=1e-5)
    # training: same gradients and BatchNorm statistics (dropout off to compare). In float64,
    # where the two kernels' different summation orders leave no visible trace: in float32 they
    # differ by float rounding amplified through the network (0.6% on the stem's gradient).
    model, twin, x = model.double(), twin.double(), x.double()
    for m in (model, twin):
        m.train()
        for mod in m.modules():
            if isinstance(mod, Dropout):
                mod.p = 0.0
    model(x).square().sum().backward()
    twin.head(_conv1d_features(twin, x)).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        err = (p.grad - q.grad).norm() / q.grad.norm()
        assert err < 1e-9, (n, float(err))
    sa, sb = model.state_dict(), twin.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-9, atol=1e-12, msg=k)


def test_plain_dropout_matches_torch_semantics_in_expectation():
    # same inverted-dropout contract as F.dropout: E[out] = x for any x
    torch.manual_seed(5)
    x = torch.linspace(-2, 2, 50)
    mean = torch.stack([dropout(x, 0.4, True) for _ in range(4000)]).mean(0)
    ref = torch.stack([F.dropout(x, 0.4, True) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, x, atol=0.08)
    assert torch.allclose(mean, ref, atol=0.12)


@pytest.mark.parametrize("c_in,c_out,length,k,stride", [(64, 64, 256, 17, 1), (32, 48, 256, 9, 4),
                                                        (64, 32, 64, 17, 4), (40, 24, 130, 7, 1),
                                                        (320, 256, 32, 1, 1)])
def test_bf16_weight_gradient_is_the_convolutions_gradient(c_in, c_out, length, k, stride, monkeypatch):
    """models/cpu_conv: forward and input gradient are oneDNN's own (bit for bit); the weight
    gradient is the exact gradient (float64 on the same bf16 inputs) to bf16 accuracy, as oneDNN's is.
    The engine's path is forced: `auto` leaves AMX CPUs to oneDNN, and this must hold everywhere."""
    from ecgsearch.models.cpu_conv import WEIGHT_GRAD_ENV, conv_2d, use_fast_path
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "engine")
    from ecgsearch.models.resnet1d import strided_padding

    torch.manual_seed(0)
    pad = strided_padding(k, stride) if stride > 1 else k // 2
    conv = torch.nn.Conv1d(c_in, c_out, k, stride=stride, padding=pad, bias=False)
    x = torch.randn(5, c_in, 1, length).contiguous(memory_format=torch.channels_last)
    g = None

    def run(fast: bool):
        nonlocal g
        xi = x.clone().requires_grad_()
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert use_fast_path(xi, conv)
            y = conv_2d(conv, xi) if fast else F.conv2d(xi, conv.weight.unsqueeze(2), None, (1, stride), (0, pad))
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        return y, xi.grad, conv.weight.grad.clone()

    (ya, dxa, dwa), (yb, dxb, dwb) = run(False), run(True)
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb)
    xd = x.bfloat16().double().requires_grad_()
    wd = conv.weight.detach().bfloat16().double().requires_grad_()
    F.conv2d(xd, wd.unsqueeze(2), None, (1, stride), (0, pad)).backward(g.double())
    exact = wd.grad.float()
    scale = exact.abs().max()
    assert (dwb - exact).abs().max() / scale < 1e-2
    assert (dwb - exact).abs().max() / scale <= 2 * (dwa - exact).abs().max() / scale + 1e-3


def test_bf16_weight_gradient_path_only_where_it_gains(monkeypatch):
    from ecgsearch.models.cpu_conv import WEIGHT_GRAD_ENV, cpu_has_amx, use_fast_path, weight_grad_mode

    wide, stem = torch.nn.Conv1d(64, 64, 17, bias=False), torch.nn.Conv1d(12, 64, 17, bias=False)
    x = torch.randn(2, 64, 1, 32)
    # auto: oneDNN's own weight gradient on AMX (it runs on the tile unit there), the engine's elsewhere
    monkeypatch.delenv(WEIGHT_GRAD_ENV, raising=False)
    assert weight_grad_mode() == ("onednn" if cpu_has_amx() else "engine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert use_fast_path(x, wide) == (not cpu_has_amx())
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "onednn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_fast_path(x, wide)
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "fast")
    with pytest.raises(ValueError, match=f"{WEIGHT_GRAD_ENV}='fast'.*auto, engine, onednn"):
        weight_grad_mode()
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "engine")
    assert not use_fast_path(x, wide)                       # fp32 training: oneDNN's fp32 kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert use_fast_path(x, wide)
        assert not use_fast_path(x, stem)                   # 12 x 17 columns: oneDNN is faster
        assert not use_fast_path(x, torch.nn.Conv1d(64, 128, 17, bias=False))   # widening, stride 1
        with torch.no_grad():
            assert not use_fast_path(x, wide)               # inference: nothing to differentiate

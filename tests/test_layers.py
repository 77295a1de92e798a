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

"""The engine's Adam is torch's, bit for bit and state for state (without its torch._dynamo import:
tests/test_process_footprint.py)."""
from __future__ import annotations

import pytest
import torch

from ecgsearch.engine.optim import Adam
from ecgsearch.models import create_model


def _steps(model, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)     # dropout masks: the same for both optimizers
    for _ in range(n):
        x, y = torch.randn(8, 12, 1024, generator=g), torch.rand(8, 6, generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _pair(fused: bool):
    torch.manual_seed(0)
    a = create_model("resnet1d_tiny", n_leads=12, num_outputs=6, n_samples=1024)
    b = create_model("resnet1d_tiny", n_leads=12, num_outputs=6, n_samples=1024)
    b.load_state_dict(a.state_dict())
    kw = {"lr": 3e-3, "weight_decay": 1e-4, "fused": fused}
    return a, torch.optim.Adam(a.parameters(), **kw), b, Adam(b.parameters(), **kw)


@pytest.mark.parametrize("fused", [True, False])
def test_the_engines_adam_takes_torchs_steps_and_swaps_state_with_it(fused):
    ref_model, ref, model, opt = _pair(fused)
    assert isinstance(opt, torch.optim.Adam)     # what ReduceLROnPlateau and checkpoints expect
    _steps(ref_model, ref, 3, seed=1)
    _steps(model, opt, 3, seed=1)
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    a, b = ref.state_dict(), opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][k][s], b["state"][k][s]) for k in a["state"] for s in a["state"][k])
    # a checkpoint from either continues in the other: swap and take three more steps each
    ref.load_state_dict(b)
    opt.load_state_dict(a)
    _steps(ref_model, ref, 3, seed=2)
    _steps(model, opt, 3, seed=2)
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    # no gradient graph is built by the update (torch's wrapper turns grad mode off around it)
    assert all(not p.requires_grad or p.grad_fn is None for p in model.parameters())

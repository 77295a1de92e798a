"""Training throughput of resnet1d at (12, 1024), batch 64: the engine against a plain fp32 loop.

Both run side by side in one process on the same synthetic cache, in interleaved rounds of
which each keeps its fastest (this machine's speed drifts by 15-25% within a minute). Also
reports achieved GFLOP/s against a large fp32 matmul and the test-fold macro AUROC of both, to
show the speed-up costs no accuracy.

    .venv/bin/python bench/train_throughput.py [--records 640] [--epochs 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.data.cache import load_cache, prepare  # noqa: E402
from ecgsearch.data.synth import synthesize  # noqa: E402
from ecgsearch.engine import TrainConfig, evaluate, train  # noqa: E402
from ecgsearch.engine.runtime import cpu_bf16_supported  # noqa: E402
from ecgsearch.metrics import classification_metrics  # noqa: E402
from ecgsearch.models import create_model  # noqa: E402
from ecgsearch.models.cpu_conv import PROFILE_LABEL, cpu_has_amx, weight_grad_mode  # noqa: E402
from ecgsearch.models.layers import Dropout  # noqa: E402


def train_flops_per_sample(model: torch.nn.Module, shape: tuple[int, int]) -> float:
    """Forward multiply-adds of convs and linears, x2 for FLOPs, x3 for forward + backward."""
    total = 0.0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv1d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0]
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hs:
        h.remove()
    return 2.0 * 3.0 * total


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def textbook(model: torch.nn.Module) -> torch.nn.Module:
    """The same network and parameters run the textbook way: (B, C, L) tensors through the
    Conv1d/BatchNorm1d modules, and torch's own nn.Dropout (same p) for every ecgsearch Dropout.
    The engine's channels-last convolutions and cheaper CPU mask are what is being measured."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, torch.nn.Dropout(child.p))

    def forward_features(x: torch.Tensor) -> torch.Tensor:
        x = model.stem(x)
        y = x
        for unit in model.units:
            x, y = unit(x, y)   # a 3-D input takes the units' Conv1d path
        return x.flatten(1)

    model.forward_features = forward_features
    return model


def plain_fp32_loop(data, epochs: int, seed: int) -> tuple[float, float]:
    """The textbook loop: whole train split as one float tensor, DataLoader, BCE, Adam, fp32,
    the model run the textbook way (see `textbook`)."""
    torch.manual_seed(seed)
    folds = data.meta["strat_fold"].to_numpy()
    tr, te = np.flatnonzero(folds <= 8), np.flatnonzero(folds == 10)

    def tensors(idx):
        x = data.signals_mv(idx)
        x = np.pad(x, ((0, 0), (0, 0), (12, 12)))  # 1000 -> 1024 samples, centred
        mu, sd = x.mean(axis=(0, 2), keepdims=True), x.std(axis=(0, 2), keepdims=True)
        return torch.from_numpy((x - mu) / sd).float(), torch.from_numpy(data.labels("rhythm", idx))

    xtr, ytr = tensors(tr)
    xte, yte = tensors(te)
    model = textbook(create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=1024))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    seconds = 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        seconds += time.perf_counter() - t0
    with torch.no_grad():
        p = torch.sigmoid(model.eval()(xte)).numpy()
    auroc = classification_metrics(yte.numpy(), p, [str(i) for i in range(6)])["macro_auroc"]
    return len(tr) * epochs / seconds, auroc


def step_profile(bf16: bool, steps: int = 3) -> tuple[float, float]:
    """(convolution ms, everything else ms) per training step of resnet1d (12, 1024), batch 64:
    the engine's model under bf16 autocast, or the textbook model in fp32. Shows where the
    engine's ratio is bounded: a step is mostly convolutions, and oneDNN's bf16 convolutions
    run only so much faster than its fp32 ones."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=1024)
    if not bf16:
        model = textbook(model)
    opt, loss_fn = torch.optim.Adam(model.parameters()), torch.nn.BCEWithLogitsLoss()
    x, y = torch.randn(64, 12, 1024), (torch.rand(64, 6) > 0.8).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        opt.zero_grad(set_to_none=True)
        loss_fn(out.float(), y).backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    # oneDNN's convolutions, and the engine's own bf16 weight gradients (models/cpu_conv.py) with
    # everything they run (products, copies)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) + \
        sum(e.cpu_time_total for e in events if e.key == PROFILE_LABEL)
    total = sum(e.self_cpu_time_total for e in events)
    return conv / steps / 1e3, (total - conv) / steps / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--loader-threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved engine/plain rounds; each keeps its fastest")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: need at least one round")
    work = Path(tempfile.mkdtemp(prefix="ecgsearch-bench-"))
    synthesize(work / "root", args.records, seed=0, fs="100", enrich=True)
    prepare(work / "root", work / "cache", fs=100)
    data = load_cache(work / "cache")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu bf16: {cpu_bf16_supported()}, "
          f"AMX: {cpu_has_amx()}; bf16 weight gradients by {weight_grad_mode()} (models/cpu_conv.py)")

    cfg = TrainConfig(model="resnet1d", task="rhythm", epochs=args.epochs, batch_size=64, bootstrap=0,
                      early_stop_patience=args.epochs + 1, loader_threads=args.loader_threads)
    n_train = int(np.isin(data.meta["strat_fold"].to_numpy(), cfg.splits["train"]).sum())
    # Interleaved rounds, each side keeping its fastest: this machine's speed drifts by 15-25%
    # within a minute (a shared host), more than the effects being measured.
    engine_sps, plain_sps, state = 0.0, 0.0, None
    for r in range(args.rounds):
        res = train(cfg, data)
        sps = n_train * len(res.history) / sum(h["train_seconds"] for h in res.history)
        p_sps, plain_auroc = plain_fp32_loop(data, args.epochs, seed=0)
        print(f"round {r + 1}: engine {sps:.1f} samples/s, plain fp32 loop {p_sps:.1f} samples/s", flush=True)
        if sps > engine_sps:
            engine_sps, state = sps, res.state
        plain_sps = max(plain_sps, p_sps)
    engine_auroc = evaluate(state, data, "test", bootstrap=0)["macro_auroc"]

    flops = train_flops_per_sample(textbook(create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=1024)),
                                   (12, 1024))
    peak = matmul_gflops()
    print(f"engine ({res.state.precision}): {engine_sps:7.1f} samples/s  {engine_sps * flops / 1e9:6.1f} GFLOP/s  "
          f"test macro AUROC {engine_auroc:.3f}")
    print(f"plain fp32 loop:      {plain_sps:7.1f} samples/s  {plain_sps * flops / 1e9:6.1f} GFLOP/s  "
          f"test macro AUROC {plain_auroc:.3f}")
    print(f"fp32 matmul 2048^2:   {peak:7.1f} GFLOP/s")
    print(f"plain fp32 loop / matmul rate: {plain_sps * flops / 1e9 / peak:.0%}; "
          f"engine / matmul rate: {engine_sps * flops / 1e9 / peak:.0%}")
    (c16, o16), (c32, o32) = step_profile(True), step_profile(False)
    print(f"profile per step (ms): bf16 engine model conv {c16:.0f} + other {o16:.0f}; "
          f"fp32 textbook conv {c32:.0f} + other {o32:.0f}")
    print(f"convolutions alone run {c32 / c16:.2f}x faster in bf16 and are {c16 / (c16 + o16):.0%} of a bf16 step; "
          f"with every other op free the ratio could reach {(c32 + o32) / c16:.2f}x")
    print(f"RATIO engine / plain fp32 loop: {engine_sps / plain_sps:.2f}x (goal >= 3.0x)")


if __name__ == "__main__":
    main()

"""Training throughput of resnet1d at (12, 1024), batch 64: the engine against a plain fp32 loop.

Both run side by side in one process on the same synthetic cache, so the ratio is robust to
a noisy machine. Also reports achieved GFLOP/s against a large fp32 matmul and the test-fold
macro AUROC of both, to show the speed-up costs no accuracy.

    .venv/bin/python bench/train_throughput.py [--records 640] [--epochs 3]
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


def plain_fp32_loop(data, epochs: int, seed: int) -> tuple[float, float]:
    """The textbook loop: whole train split as one float tensor, DataLoader, BCE, Adam, fp32."""
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
    model = create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=1024)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ecgsearch-bench-"))
    synthesize(work / "root", args.records, seed=0, fs="100", enrich=True)
    prepare(work / "root", work / "cache", fs=100)
    data = load_cache(work / "cache")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu bf16: {cpu_bf16_supported()}")

    cfg = TrainConfig(model="resnet1d", task="rhythm", epochs=args.epochs, batch_size=64, bootstrap=0,
                      early_stop_patience=args.epochs + 1)
    res = train(cfg, data)
    n_train = int(np.isin(data.meta["strat_fold"].to_numpy(), cfg.splits["train"]).sum())
    engine_sps = n_train * len(res.history) / sum(h["train_seconds"] for h in res.history)
    engine_auroc = evaluate(res.state, data, "test", bootstrap=0)["macro_auroc"]
    plain_sps, plain_auroc = plain_fp32_loop(data, args.epochs, seed=0)

    flops = train_flops_per_sample(create_model("resnet1d", n_leads=12, num_outputs=6, n_samples=1024), (12, 1024))
    peak = matmul_gflops()
    print(f"engine ({res.state.precision}): {engine_sps:7.1f} samples/s  {engine_sps * flops / 1e9:6.1f} GFLOP/s  "
          f"test macro AUROC {engine_auroc:.3f}")
    print(f"plain fp32 loop:      {plain_sps:7.1f} samples/s  {plain_sps * flops / 1e9:6.1f} GFLOP/s  "
          f"test macro AUROC {plain_auroc:.3f}")
    print(f"fp32 matmul 2048^2:   {peak:7.1f} GFLOP/s")
    print(f"RATIO engine / plain fp32 loop: {engine_sps / plain_sps:.2f}x (goal >= 3.0x)")
    print(f"RATIO plain fp32 loop / matmul rate: {plain_sps * flops / 1e9 / peak:.0%}; "
          f"engine / matmul rate: {engine_sps * flops / 1e9 / peak:.0%}")


if __name__ == "__main__":
    main()

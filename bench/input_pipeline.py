"""The input pipeline alone at Ribeiro et al.'s geometry, (12, 4096) at 400 Hz, side by side in one run:

- copy:           a plain fancy-indexed copy of the same int16 bytes per batch (this machine's limit)
- loader:         engine/loader.py on a model-geometry cache (`data prepare --fs 500 --target-fs 400
                  --n-samples 4096`): int16 read, normalised where the model runs (here the CPU)
- per-batch path: the engine before: a 500 Hz cache resampled, padded and normalised in every batch
                  on the training loop's thread

"one core" pins this process to one CPU: the loader then builds batches in place (its default there;
a worker thread on the same CPU is shown too: hand-offs only). With two CPUs it has worker threads,
which overlap a real training step; here the consumer does nothing, so they show hand-off cost.

    .venv/bin/python bench/input_pipeline.py [--records 512] [--batch 64] [--seconds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.data.cache import load_cache, prepare  # noqa: E402
from ecgsearch.data.synth import synthesize  # noqa: E402
from ecgsearch.engine import TrainConfig  # noqa: E402
from ecgsearch.engine import prep as P  # noqa: E402
from ecgsearch.engine.loader import Loader, chunked  # noqa: E402


@contextlib.contextmanager
def cpus(n: int):
    """Run the block on the first `n` CPUs this process may use (and as many torch threads)."""
    allowed = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, allowed[:n])
    torch.set_num_threads(min(n, len(allowed)))
    try:
        yield min(n, len(allowed))
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def rate(batches_of_epoch, n_per_epoch: int, seconds: float) -> float:
    """Samples/s over whole epochs, repeated for at least `seconds` after one warm-up epoch."""
    for _ in batches_of_epoch():
        pass
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in batches_of_epoch():
            pass
        done += n_per_epoch
    return done / (time.perf_counter() - t0)


def step_profile(geo, prep, chunks) -> tuple[float, float, float]:
    """Milliseconds per batch, on the current CPUs, of the loader's two steps on its CPU path and
    of a plain copy: where its rate is bounded."""
    from ecgsearch.engine.loader import _Norm

    norm, shape = _Norm(prep.norm, geo.gain, "cpu"), (len(chunks[0]), *geo.signals.shape[1:])
    adu, out = torch.empty(shape, dtype=torch.int16), torch.empty(shape)
    full = [c for c in chunks if len(c) == shape[0]]     # whole batches only: one buffer shape

    def per_batch(fn) -> float:
        fn(full[0])
        t0 = time.perf_counter()
        for c in full * 5:
            fn(c)
        return 1e3 * (time.perf_counter() - t0) / (5 * len(full))

    gather = per_batch(lambda c: np.take(geo.signals, c, axis=0, out=adu.numpy(), mode="clip"))
    normalise = per_batch(lambda c: norm(adu, out))
    copy = per_batch(lambda c: geo.signals[np.sort(c)])
    return gather, normalise, copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ecgsearch-bench-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "root", args.records, seed=0, fs="500")
        prepare(tmp / "root", tmp / "c500", 500)
        t0 = time.perf_counter()
        prepare(tmp / "root", tmp / "c400", 500, target_fs=400, n_samples=4096)
        t_prep = time.perf_counter() - t0
        native, geo = load_cache(tmp / "c500"), load_cache(tmp / "c400")
        cfg = TrainConfig(task="rhythm", target_fs=400, n_samples=4096, batch_size=args.batch, bootstrap=0,
                          splits={"train": list(range(1, 9)), "val": [9], "test": [10]})
        idx = np.random.default_rng(0).permutation(len(geo))
        chunks = chunked(idx, args.batch)
        prep_geo, _ = P.fit(cfg, geo)
        prep_old, _ = P.fit(cfg, native)
        n = len(idx)
        print(f"{n} records, batch {args.batch}, (12, 4096) at 400 Hz; model-geometry cache written once in "
              f"{t_prep:.1f} s ({n / t_prep:.0f} records/s)")

        def copy_epoch():
            for c in chunks:
                yield geo.signals[np.sort(c)]

        def loader_epoch(threads):   # one loader per training, as the engine has it
            loader = Loader(prep_geo, geo, "cpu", threads=threads)
            return lambda: loader.batches(chunks, reuse=True)

        def old_epoch():
            for c in chunks:
                x, y = P.batch(prep_old, native, c)
                yield torch.from_numpy(x), torch.from_numpy(y)

        out = {}
        with cpus(1):
            out["copy, one core"] = rate(copy_epoch, n, args.seconds)
            out["loader, one core"] = rate(loader_epoch(None), n, args.seconds)       # in place: no hand-offs
            out["loader, one core, 1 worker thread"] = rate(loader_epoch(1), n, args.seconds)
            out["per-batch path, one core"] = rate(old_epoch, n, max(1.0, args.seconds / 3))
            prof = step_profile(geo, prep_geo, chunks)
        with cpus(2) as k:
            out[f"copy, {k} CPUs"] = rate(copy_epoch, n, args.seconds)
            out[f"loader, 1 worker thread, {k} CPUs"] = rate(loader_epoch(1), n, args.seconds)
            out[f"loader, 2 worker threads, {k} CPUs"] = rate(loader_epoch(2), n, args.seconds)
        for name, v in out.items():
            print(f"{name:<36s} {v:10.0f} samples/s")
        loader, copy, old = out["loader, one core"], out["copy, one core"], out["per-batch path, one core"]
        print("one core, per batch of %d: gather %.2f ms, normalise %.2f ms (int16 -> float32, / gain, - mean, "
              "/ std: the host path's operations, for bit-identity), a plain copy %.2f ms" % (args.batch, *prof))
        print(f"goal: loader >= 25,000 samples/s on one core ({'met' if loader >= 25_000 else 'NOT met'}) and "
              f">= 30% of the copy ({'met' if loader >= 0.3 * copy else 'NOT met'})")
        print(f"RATIO loader / copy: {100 * loader / copy:.0f}%")
        print(f"RATIO loader / per-batch path: {loader / old:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

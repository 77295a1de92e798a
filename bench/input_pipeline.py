"""The input pipeline alone at Ribeiro et al.'s geometry, (12, 4096) at 400 Hz, side by side in one run:

- copy:           a plain fancy-indexed copy of the same int16 bytes per batch (this machine's limit)
- loader:         engine/loader.py on a model-geometry cache (`data prepare --fs 500 --target-fs 400
                  --n-samples 4096`): int16 read, normalised where the model runs (here the CPU)
- per-batch path: the engine before: a 500 Hz cache resampled, padded and normalised in every batch
                  on the training loop's thread

"one core" pins this process to one CPU: the loader then builds batches in place (its default there;
a worker thread on the same CPU is shown too: hand-offs only). With two CPUs it has worker threads,
which overlap a real training step; here the consumer does nothing, so they show hand-off cost.

    .venv/bin/python bench/input_pipeline.py [--records 512] [--batch 64] [--seconds 3] [--rounds 5]
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


def rounds(variants: dict, n_per_epoch: int, seconds: float, k: int) -> dict[str, list[float]]:
    """Each variant's rate in `k` interleaved rounds of `seconds` / `k`: a machine's slow spell
    then falls on every variant alike, and the spread between rounds is the figure's noise."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(k):
        for name, (epoch, secs) in variants.items():
            out[name].append(rate(epoch, n_per_epoch, secs / k))
    return out


def step_profile(loader, geo, chunks) -> tuple[float, float, float, float]:
    """Milliseconds per batch, on the current CPUs: the loader's CPU path whole, its int16 ->
    float32 copy from the page cache alone (the rest is the scale and shift), and a plain copy of
    the int16 bytes: where its rate is bounded."""
    shape = (len(chunks[0]), *geo.signals.shape[1:])
    sig_, flat, ring = np.asarray(geo.signals), np.empty(shape, np.float32), {}
    full = [c for c in chunks if len(c) == shape[0]]     # whole batches only: one buffer shape

    def per_batch(fn) -> float:
        fn(full[0])
        t0 = time.perf_counter()
        for c in full * 5:
            fn(c)
        return 1e3 * (time.perf_counter() - t0) / (5 * len(full))

    def convert(c):
        for i, r in enumerate(c):
            np.copyto(flat[i], sig_[r])

    whole = per_batch(lambda c: loader._read_normalised(c, (ring, 0)))
    conv = per_batch(convert)
    copy = per_batch(lambda c: geo.signals[np.sort(c)])
    return whole, conv, whole - conv, copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
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

        one = {"copy, one core": (copy_epoch, args.seconds),
               "loader, one core": (loader_epoch(None), args.seconds),          # in place: no hand-offs
               "loader, one core, 1 worker thread": (loader_epoch(1), args.seconds),
               "per-batch path, one core": (old_epoch, max(1.0, args.seconds / 3) * args.rounds)}
        with cpus(1):
            out = rounds(one, n, args.seconds, args.rounds)
            prof = step_profile(Loader(prep_geo, geo, "cpu", threads=0), geo, chunks)
        with cpus(2) as k:
            out.update(rounds({f"copy, {k} CPUs": (copy_epoch, args.seconds),
                               f"loader, 1 worker thread, {k} CPUs": (loader_epoch(1), args.seconds),
                               f"loader, 2 worker threads, {k} CPUs": (loader_epoch(2), args.seconds)},
                              n, args.seconds, args.rounds))
        print(f"median of {args.rounds} interleaved rounds [slowest - fastest round], samples/s")
        for name, v in out.items():
            print(f"{name:<36s} {np.median(v):10.0f}  [{min(v):.0f} - {max(v):.0f}]")
        # each ratio's rounds side by side: round i of the loader against round i of the copy
        loader, copy, old = (np.asarray(out[x]) for x in ("loader, one core", "copy, one core", "per-batch path, one core"))
        to_copy, to_old = loader / copy, loader / old
        print("one core, per batch of %d: loader %.2f ms = int16 -> float32 copy from the page cache %.2f ms + "
              "scale and shift %.2f ms (Normalizer.apply's operations); a plain copy of the int16 bytes %.2f ms"
              % (args.batch, *prof))
        print(f"loader / copy per round: {', '.join(f'{100 * r:.0f}%' for r in to_copy)}")
        med, med_copy = float(np.median(loader)), float(np.median(to_copy))
        print(f"goal: loader >= 25,000 samples/s on one core ({'met' if med >= 25_000 else 'NOT met'}"
              f"{'' if (min(loader) >= 25_000) == (med >= 25_000) else ', within noise'}) and >= 30% of the "
              f"copy ({'met' if med_copy >= 0.3 else 'NOT met'}"
              f"{'' if (min(to_copy) >= 0.3) == (max(to_copy) >= 0.3) else ', within noise: rounds on both sides'})")
        print(f"RATIO loader / copy: {100 * med_copy:.0f}% [{100 * min(to_copy):.0f}-{100 * max(to_copy):.0f}%]")
        print(f"RATIO loader / per-batch path: {float(np.median(to_old)):.1f}x [{min(to_old):.1f}-{max(to_old):.1f}x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

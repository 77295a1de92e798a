"""Parallel efficiency of one RLE step, and what a Ray Train run per candidate costs, in one run.

One retrain-mode step from N leads trains N candidate models. The same step runs as Ray
Tune trials, each trial single-threaded (1 CPU, torch threads = 1): with at most 1 trial at
a time and with 2 at a time, each one-worker candidate training in its trial's process (the
default); and 2 at a time with every candidate a one-worker Ray Train run (`TorchTrainer`,
as searches ran before). The three alternate `--repeats` times; the fastest run of each
counts. Efficiency = T1 / (2 * T2), goal >= 80%; the per-candidate cost of a Ray Train run is
(T2 as Ray Train runs - T2) * 2 / N. Every run has a fresh output folder, so nothing is
reused between them, and Ray starts before the clock does.

    .venv/bin/python bench/rle_parallel.py [--leads I,II,V1,V2] [--records 1000] [--epochs 8] [--repeats 2]

Prints a table and writes bench/out/rle_parallel.json; the last line is
`RATIO Ray Train runs / in-trial training (2 at a time): Xx`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.engine import TrainConfig  # noqa: E402
from ecgsearch.leads import parse_leads  # noqa: E402
from ecgsearch.search.context import SearchContext, SearchSettings  # noqa: E402
from ecgsearch.search.rle import candidate_subsets  # noqa: E402


def one_step(data: str, out: Path, leads, cfg: TrainConfig, concurrent: int, model: str,
             runner: str = "trial") -> tuple[float, float]:
    """(wall seconds of the step, mean seconds one candidate's trial spent on its unit)."""
    s = SearchSettings(data=data, task="rhythm", model=model, out=out, mode="retrain", base=cfg,
                       start_leads=leads, min_leads=len(leads) - 1, cpus_per_trial=1.0,
                       # the search sets each training's budget: exactly cfg.epochs, no early stop
                       epochs=cfg.epochs, patience=cfg.epochs + 1,
                       max_concurrent=concurrent, executor="ray", baselines=False, tracking=False)
    ctx = SearchContext(s, s.fingerprint("bench", concurrent=concurrent, runner=runner))
    ctx.executor.train_runner = runner
    units = [ctx.train_unit(kept, 0) for _, kept in candidate_subsets(leads)]
    t0 = time.perf_counter()
    res = ctx.ensure(units, f"bench step, {concurrent} worker(s)")
    return time.perf_counter() - t0, sum(r["finished"] - r["started"] for r in res) / len(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leads", default="I,II,V1,V2", help="start set; one candidate per lead (use an even count)")
    ap.add_argument("--records", type=int, default=1000, help="synthetic records (100 Hz)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--model", default="mlresnet_tiny")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the fastest of each counts")
    ap.add_argument("--data", help="an existing cache instead of a synthetic one")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)

    import ray

    from ecgsearch.data.cache import prepare
    from ecgsearch.distributed.cluster import ClusterSettings, ensure_ray
    from ecgsearch.data.synth import synthesize

    leads = parse_leads(args.leads)
    with tempfile.TemporaryDirectory(prefix="rle-bench-") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            raw = tmp / "raw"
            synthesize(raw, args.records, seed=0, fs="100", informative_leads=("V2",))
            data = str(tmp / "cache")
            prepare(raw, data, fs=100)
        cfg = TrainConfig(epochs=args.epochs, batch_size=32, bootstrap=0, precision="fp32",
                          early_stop_patience=args.epochs + 1)
        # A 2-CPU Ray (workers import this working tree), started before any clock runs.
        ensure_ray(ClusterSettings(num_cpus=2))
        try:
            load0 = os.getloadavg()[0]
            setups = {"1": (1, "trial"), "2": (2, "trial"), "2 Ray Train": (2, "torchtrainer")}
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
            # Alternate the settings and keep each one's fastest run: on a shared machine
            # that filters out the repeats that other processes slowed down.
            for rep in range(args.repeats):
                for k, (w, runner) in setups.items():
                    runs[k].append(one_step(data, tmp / f"{runner}{w}-{rep}", leads, cfg, w, args.model, runner))
            (t1, u1), (t2, u2), (tt, ut) = (min(runs[k]) for k in setups)
            load1 = os.getloadavg()[0]
        finally:
            ray.shutdown()
    eff = t1 / (2 * t2)
    per_candidate = (tt - t2) * 2 / len(leads)
    rows = {"candidates": len(leads), "model": args.model, "epochs": args.epochs, "records": args.records,
            "seconds_1_worker": round(t1, 2), "seconds_2_workers": round(t2, 2),
            "seconds_2_workers_ray_train_runs": round(tt, 2),
            "speedup": round(t1 / t2, 3), "parallel_efficiency": round(eff, 3), "goal": 0.8,
            "ray_train_over_in_trial": round(tt / t2, 3), "ray_train_seconds_per_candidate": round(per_candidate, 2),
            # A trial that takes longer when two run at once means the cores were not free
            # (other processes): check these before reading the efficiency.
            "mean_trial_seconds_1_worker": round(u1, 2), "mean_trial_seconds_2_workers": round(u2, 2),
            "mean_trial_seconds_2_workers_ray_train_runs": round(ut, 2),
            "all_runs_seconds": {k: [round(t, 2) for t, _ in r] for k, r in runs.items()},
            "loadavg_1min_before_after": [round(load0, 2), round(load1, 2)], "cpus": os.cpu_count()}
    print(f"{'at a time':>10} {'candidates train':>22} {'seconds':>9} {'mean trial s':>13}")
    for label, (t, u), how in ((1, (t1, u1), "in their trial"), (2, (t2, u2), "in their trial"),
                               (2, (tt, ut), "as Ray Train runs")):
        print(f"{label:>10} {how:>22} {t:>9.1f} {u:>13.1f}")
    print(f"speedup {t1 / t2:.2f}x, parallel efficiency {eff:.0%} (goal >= 80%)")
    print(f"mean trial {u1:.1f} s alone vs {u2:.1f} s two at a time; load average {load0:.1f} -> {load1:.1f}")
    print(f"a Ray Train run per candidate costs {per_candidate:.1f} s more per candidate")
    print(f"RATIO Ray Train runs / in-trial training (2 at a time): {tt / t2:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rle_parallel.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

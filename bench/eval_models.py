"""Eval-mode RLE with one shared masked model vs a model retrained per step, side by side.

For each data/training seed, runs the same search twice (`--eval-model shared` and
`--eval-model per-step`, same repeats, same budget) and reports, per variant: whether the
planted leads survived (synthetic) or which set was kept (real), how many steps were
decisive, the mean between-seed SD of the candidates' validation scores (training noise in
the step decisions), the trainings it cost and its wall time. Across seeds: how often the
kept sets agree. Last lines: `RATIO per-step / shared trainings: X` and the agreement figures.

    .venv/bin/python bench/eval_models.py --task superclass --seeds 0 1 2
    .venv/bin/python bench/eval_models.py --real /path/to/ptbxl-sample --task age --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.data.cache import prepare  # noqa: E402
from ecgsearch.data.synth import synthesize  # noqa: E402
from ecgsearch.engine import TrainConfig  # noqa: E402
from ecgsearch.search.context import SearchSettings  # noqa: E402
from ecgsearch.search.pipeline import run_rle  # noqa: E402

PLANTED = ("AVL", "V2")
OUT = Path(__file__).resolve().parent / "out"


def cache_for(args, seed: int) -> Path:
    work = Path(args.work)
    if args.real:
        cache = work / "real100"
        if not cache.exists():
            prepare(args.real, cache, 100)
        return cache
    root, cache = work / f"synth{seed}", work / f"synth{seed}-100"
    if not cache.exists():
        synthesize(root, args.records, seed=seed, fs="100", informative_leads=",".join(PLANTED), enrich=True)
        prepare(root, cache, 100)
    return cache


def one(args, seed: int, variant: str) -> dict:
    cache = cache_for(args, seed)
    splits = {"train": [1, 2, 3, 4, 5, 6, 7, 8], "val": [9], "test": [10]} if args.real else \
        {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}
    base = TrainConfig(batch_size=32 if args.real else 16, lr=3e-3 if args.real else 5e-3,
                       n_samples=None if args.real else 512, bootstrap=300, threads=1, seed=seed, splits=splits,
                       model_kwargs={"stem_stride": 2} if not args.real else {})
    out = Path(args.work) / f"{args.task}-{variant}-{seed}-{time.time():.0f}"
    t0 = time.perf_counter()
    r = run_rle(SearchSettings(data=str(cache), task=args.task, model="mlresnet_tiny", out=out, mode="eval",
                               eval_model=variant, base=base, min_leads=args.min_leads, repeats=args.repeats,
                               epochs=args.epochs, patience=args.patience, executor="local", tracking=False,
                               baselines=False, progress=False))
    secs = time.perf_counter() - t0
    state = json.loads((out / "state.json").read_text())["results"]
    sds = [c["seed_sd"] for st in r["steps"] for c in st["candidates"] if c["seed_sd"] is not None]
    return {"seed": seed, "variant": variant, "kept": r["kept"], "order": r["elimination_order"],
            "planted_kept": set(PLANTED) <= set(r["kept"]) if not args.real else None,
            "decisive": sum(st["decisive"] for st in r["steps"]), "steps": len(r["steps"]),
            "mean_candidate_seed_sd": float(np.mean(sds)) if sds else None,
            "trainings": sum(k.startswith("train:") for k in state), "seconds": secs,
            "answer": r["answer_line"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="superclass")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--real", help="PTB-XL root (e.g. the 500-record sample) instead of planted synthetic data")
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--min-leads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ecgsearch-bench-eval-models")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = [one(args, seed, v) for seed in args.seeds for v in ("shared", "per-step")]
    print(f"{'variant':<9} {'seed':>4} {'kept':<16} {'planted':>7} {'decisive':>8} {'cand. seed SD':>13} "
          f"{'trainings':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['variant']:<9} {r['seed']:>4} {','.join(r['kept']):<16} {str(r['planted_kept']):>7} "
              f"{r['decisive']:>4}/{r['steps']:<3} {r['mean_candidate_seed_sd'] or float('nan'):>13.4f} "
              f"{r['trainings']:>9} {r['seconds']:>8.0f}")
    summary = {}
    for v in ("shared", "per-step"):
        mine = [r for r in rows if r["variant"] == v]
        pairs = list(combinations(mine, 2))
        summary[v] = {"kept_sets_agree": sum(a["kept"] == b["kept"] for a, b in pairs), "pairs": len(pairs),
                      "planted_kept": sum(bool(r["planted_kept"]) for r in mine), "runs": len(mine),
                      "trainings": sum(r["trainings"] for r in mine), "seconds": sum(r["seconds"] for r in mine),
                      "mean_candidate_seed_sd": float(np.mean([r["mean_candidate_seed_sd"] for r in mine]))}
    OUT.mkdir(exist_ok=True)
    tag = "real" if args.real else "synth"
    (OUT / f"eval_models-{args.task}-{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                                          "summary": summary}, indent=1))
    for v, s in summary.items():
        print(f"{v}: kept sets agree in {s['kept_sets_agree']}/{s['pairs']} seed pairs; planted leads kept "
              f"{s['planted_kept']}/{s['runs']}; mean candidate seed SD {s['mean_candidate_seed_sd']:.4f}; "
              f"{s['trainings']} trainings, {s['seconds']:.0f} s")
    print(f"RATIO per-step / shared trainings: {summary['per-step']['trainings'] / summary['shared']['trainings']:.1f}x")
    print(f"RATIO per-step / shared wall time: {summary['per-step']['seconds'] / summary['shared']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

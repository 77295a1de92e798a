"""How many training seeds (`--repeats R`) does a lead-search unit need?

Trains one configuration with S seeds (the seed changes only weight init, batch order and
lead-dropout draws; the fold split is fixed), and per seed scores the test fold in fp32 with
`ecgsearch.engine.predict_split`:

- the task metric with all 12 leads (superclass/rhythm: macro AUROC; age: MAE);
- Delta = metric(subset) - metric(12 leads) of the SAME model, the subset read by masking the
  other leads of an ML-ResNet trained with subset lead dropout (the RLE's eval mode).

Two sources of uncertainty are then compared:

- training variance: sd_seed, the between-seed SD of the value on the fixed test fold; a
  mean of R seeds has training SE sd_seed / sqrt(R);
- test sampling: the bootstrap SE of one seed's value (SD of the metric over B resamples of
  the test records; for Delta the records are resampled jointly for both arms, i.e. paired).
  One (B, n) index matrix serves every seed, so the bootstrap SE of the mean over seeds comes
  out too.

Recommendation: the smallest R with sd_seed / sqrt(R) <= the test SE of one seed's Delta
(median over seeds), i.e. training noise no larger than the test-sampling noise that no number
of seeds removes. sd_seed from S seeds is itself uncertain (chi-square CI with S-1 df), so
the R at the CI's upper end is shown too.

    .venv/bin/python bench/repeats.py --cache /tmp/rep/real100 --task superclass --label superclass-real
    .venv/bin/python bench/repeats.py --cache /tmp/rep/syn100 --task superclass --seeds 4 \
        --subset AVL,V2 --label superclass-synth

Results are merged into bench/out/repeats.json under --label.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.data.cache import load_cache  # noqa: E402
from ecgsearch.engine import TrainConfig, predict_split, train  # noqa: E402
from ecgsearch.leads import LABEL_SETS, LEADS, leads_key, parse_leads  # noqa: E402
from ecgsearch.metrics import classification_metrics, regression_metrics  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "repeats.json"


# ------------------------------------------------------------------------- metrics

def metric_name(task: str) -> str:
    return "mae" if task == "age" else "macro_auroc"


def point_metric(task: str, y: np.ndarray, p: np.ndarray) -> float:
    if task == "age":
        return regression_metrics(y, p)["mae"]
    return classification_metrics(y, p, LABEL_SETS[task])["macro_auroc"]


def boot_metric(task: str, y: np.ndarray, p: np.ndarray, bidx: np.ndarray) -> np.ndarray:
    """The metric on each resample (rows of bidx index the test records) -> (B,)."""
    return np.array([point_metric(task, y[i], p[i]) for i in bidx])


def nansd(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.std(ddof=1)) if a.size > 1 else float("nan")


def sd_ci(sd: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Chi-square CI of a normal SD estimated from n values."""
    from scipy.stats import chi2

    df = n - 1
    if df < 1 or not math.isfinite(sd):
        return float("nan"), float("nan")
    return (sd * math.sqrt(df / chi2.ppf(1 - alpha / 2, df)), sd * math.sqrt(df / chi2.ppf(alpha / 2, df)))


def smallest_r(sd_seed: float, test_se: float, r_max: int) -> tuple[int | None, int | None]:
    """(smallest R in 1..r_max with sd_seed/sqrt(R) <= test_se or None, the unbounded R = ceil((sd/se)^2))."""
    if not (math.isfinite(sd_seed) and math.isfinite(test_se)) or test_se <= 0:
        return None, None
    need = max(1, math.ceil((sd_seed / test_se) ** 2 - 1e-12))
    return (need if need <= r_max else None), need


# ------------------------------------------------------------------------- main

def decompose(sd: float, se_per_seed, se_of_mean: float, n_seeds: int) -> dict:
    """Split one seed's bootstrap variance into a part shared by all seeds and a seed x record part.

    With one resample matrix for every seed, one seed's bootstrap variance is (vc + ve)/n and that
    of the mean over S seeds is (vc + ve/S)/n, where vc/n is the test sampling no number of seeds
    removes (the floor) and ve/n the seed-specific scatter over records. ve/n is also part of
    sd_seed^2 (a seed's value on the fixed test fold), so the variance of a mean of R seeds around
    its expectation over seeds and test populations is sd_seed^2/R + vc/n.
    """
    se1_sq = float(np.nanmean(np.square(se_per_seed)))
    ve = (se1_sq - se_of_mean ** 2) * n_seeds / (n_seeds - 1) if n_seeds > 1 else float("nan")
    vc = se1_sq - ve
    floor = math.sqrt(vc) if vc > 0 else 0.0
    return {"se1_rms": math.sqrt(se1_sq), "seed_x_record_sd": math.sqrt(max(ve, 0.0)),
            "test_floor_se": floor, "seed_level_sd": math.sqrt(max(sd ** 2 - ve, 0.0)),
            "R_needed_vs_floor": (math.ceil(sd ** 2 / vc - 1e-12) if vc > 0 else None)}


def summarise(name: str, per_seed: list[float], se_per_seed: list[float], se_of_mean: float, r_max: int) -> dict:
    v = np.asarray(per_seed, dtype=np.float64)
    n = int(np.isfinite(v).sum())
    sd = nansd(v)
    test_se = float(np.nanmedian(se_per_seed))
    lo, hi = sd_ci(sd, n)
    r, r_inf = smallest_r(sd, test_se, r_max)
    _, r_hi = smallest_r(hi, test_se, 10**6)
    dec = decompose(sd, se_per_seed, se_of_mean, n)
    floor = dec["test_floor_se"]
    return {
        "name": name, "per_seed": v.tolist(), "mean": float(np.nanmean(v)), "median": float(np.nanmedian(v)),
        "sd_seed": sd, "sd_seed_ci95": [lo, hi], "test_se_per_seed": list(map(float, se_per_seed)),
        "test_se": test_se, "test_se_of_seed_mean": se_of_mean, "decomposition": dec,
        "R_table": [{"R": R, "train_se": sd / math.sqrt(R), "test_se": test_se,
                     "total_se_naive": math.sqrt(sd**2 / R + test_se**2),
                     "total_se": math.sqrt(sd**2 / R + floor**2),
                     "train_le_test": bool(sd / math.sqrt(R) <= test_se)}
                    for R in range(1, max(r_max, 12) + 1)],
        "recommended_R": r, "R_needed": r_inf, "R_needed_at_sd_ci_upper": r_hi,
    }


def print_run(out: dict) -> None:
    seeds, S = out["seeds"], out["n_seeds"]
    print()
    print(f"== {out['label']}: task {out['task']}, cache {out['cache']}, n_test={out['n_test']}, S={S} seeds, "
          f"B={out['bootstrap']} bootstrap resamples, epochs={out['config']['epochs']}, "
          f"patience={out['config']['early_stop_patience']}")
    if out.get("note"):
        print(f"   note: {out['note']}")
    if out.get("baseline"):
        b = out["baseline"]
        print(f"   age baseline: MAE of predicting the train-mean age ({b['train_mean_age']:.1f}) = "
              f"{b['mae_predict_train_mean']:.3f}")
    print("   wall per training: " + ", ".join(f"{s['wall_s']:.0f}s" for s in seeds)
          + "  (epochs run / best: " + ", ".join(f"{s['epochs_run']}/{s['best_epoch']}" for s in seeds) + ")")
    for summ in [out["metric12"]] + list(out["deltas"].values()):
        dec = summ["decomposition"]
        print(f"-- {summ['name']}")
        print("   seed   value     boot_se")
        for s, v, se in zip(seeds, summ["per_seed"], summ["test_se_per_seed"]):
            print(f"   {s['seed']:>4}  {v:+.4f}   {se:.4f}")
        lo, hi = summ["sd_seed_ci95"]
        print(f"   mean {summ['mean']:+.4f}  median {summ['median']:+.4f}  sd_seed {summ['sd_seed']:.4f} "
              f"(95% CI {lo:.4f}-{hi:.4f})  test_se(1 seed, median) {summ['test_se']:.4f}  "
              f"test_se(mean of {S}) {summ['test_se_of_seed_mean']:.4f}")
        print(f"   decomposition: seed x record sd {dec['seed_x_record_sd']:.4f}, test floor se "
              f"{dec['test_floor_se']:.4f}, seed-level sd {dec['seed_level_sd']:.4f}")
        print("   R   train_se=sd/sqrtR   test_se(1 seed)   train<=test   total_se=sqrt(sd^2/R+floor^2)")
        for r in summ["R_table"]:
            if r["R"] > S and r["R"] not in (8, 10, 12):
                continue
            print(f"   {r['R']:<3} {r['train_se']:.4f}             {r['test_se']:.4f}            "
                  f"{'yes' if r['train_le_test'] else 'no ':<3}           {r['total_se']:.4f}")
        print(f"   smallest R with sd_seed/sqrt(R) <= test_se(1 seed): "
              f"{summ['recommended_R'] if summ['recommended_R'] else '>' + str(S)} "
              f"(unbounded: {summ['R_needed']}; at sd_seed's 95% upper bound: {summ['R_needed_at_sd_ci_upper']}); "
              f"stricter, sd_seed^2/R <= floor^2: {dec['R_needed_vs_floor']}")


def finish(out: dict, primary: str) -> None:
    prim = out["deltas"][primary]
    rec = prim["recommended_R"] if prim["recommended_R"] else prim["R_needed"]
    out["recommendation"] = {"criterion": "smallest R with sd_seed(Delta)/sqrt(R) <= paired bootstrap test SE "
                                          "of one seed's Delta (median over seeds)",
                             "delta_subset": primary, "repeats": rec,
                             "repeats_for_metric": out["metric12"]["recommended_R"] or out["metric12"]["R_needed"],
                             "repeats_vs_floor": prim["decomposition"]["R_needed_vs_floor"]}


def report(path: Path) -> int:
    """Reprint (and refresh the summaries of) every run stored in repeats.json; trains nothing."""
    allres = json.loads(path.read_text())
    lines = []
    for label, out in allres.items():
        S = out["n_seeds"]
        m = out["metric12"]
        out["metric12"] = summarise(m["name"], m["per_seed"], m["test_se_per_seed"], m["test_se_of_seed_mean"], S)
        for key, d in out["deltas"].items():
            out["deltas"][key] = summarise(d["name"], d["per_seed"], d["test_se_per_seed"],
                                           d["test_se_of_seed_mean"], S)
        primary = out.get("recommendation", {}).get("delta_subset") or next(iter(out["deltas"]))
        finish(out, primary)
        print_run(out)
        r = out["recommendation"]
        lines.append(f"RECOMMEND repeats={r['repeats']} ({label}; Delta {primary} vs 12; metric alone: "
                     f"{r['repeats_for_metric']}; vs test floor: {r['repeats_vs_floor']})")
    path.write_text(json.dumps(allres, indent=1))
    print()
    for line in lines:
        print(line)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="reprint every run stored in --out; train nothing")
    ap.add_argument("--cache")
    ap.add_argument("--task", choices=["superclass", "rhythm", "age"])
    ap.add_argument("--label", default=None, help="key in repeats.json (default: <task>-<cache name>)")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--subset", action="append", default=None,
                    help="kept leads for a Delta (repeatable); the first one drives the recommendation "
                         "(default I,II,V2)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lead-dropout", type=float, default=0.5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--boot", type=int, default=500, help="bootstrap resamples of the test fold")
    ap.add_argument("--boot-seed", type=int, default=12345)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if a.report:
        return report(Path(a.out))
    if not (a.cache and a.task):
        ap.error("--cache and --task are required unless --report")

    subsets = [parse_leads(s) for s in (a.subset or ["I,II,V2"])]
    cache = load_cache(a.cache)
    label = a.label or f"{a.task}-{Path(a.cache).name}"
    mname = metric_name(a.task)
    base = TrainConfig(model="mlresnet_tiny", task=a.task, epochs=a.epochs, early_stop_patience=a.patience,
                       batch_size=a.batch_size, lr=a.lr, precision=a.precision, threads=a.threads, bootstrap=0,
                       model_kwargs={"lead_dropout": a.lead_dropout, "lead_dropout_mode": "subset"})

    # reference for age: the MAE of predicting the training folds' mean age
    baseline = None
    if a.task == "age":
        tr = cache.split_indices("train")
        tr_age = cache.ages(tr)
        tr_mean = float(np.nanmean(tr_age))

    seeds, preds = [], []
    bidx = None
    t_all = time.perf_counter()
    for k in range(a.seeds):
        seed = a.seed0 + k
        cfg = base.replace(seed=seed)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as td:
            res = train(cfg, cache, out_dir=td)
            wall = time.perf_counter() - t0
            ck = res.state
            idx, y, p12 = predict_split(ck, cache, "test")
            arms = {}
            for sub in subsets:
                drop = [ld for ld in LEADS if ld not in sub]
                idx_s, y_s, p_s = predict_split(ck, cache, "test", drop_leads=drop)
                if not (np.array_equal(idx_s, idx) and np.array_equal(y_s, y)):
                    raise RuntimeError("test records differ between arms")
                arms[leads_key(sub)] = p_s
        if bidx is None:
            bidx = np.random.default_rng(a.boot_seed).integers(0, len(idx), size=(a.boot, len(idx)))
            if a.task == "age":
                baseline = {"train_mean_age": tr_mean,
                            "mae_predict_train_mean": float(np.abs(np.asarray(y).ravel() - tr_mean).mean())}
            ref_idx = idx
        elif not np.array_equal(idx, ref_idx):
            raise RuntimeError("test records differ between seeds")
        m12 = point_metric(a.task, y, p12)
        b12 = boot_metric(a.task, y, p12, bidx)
        row = {"seed": seed, "wall_s": wall, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
               "best_val_score": res.best_score, "metric12": m12, "metric12_boot_se": nansd(b12), "delta": {}}
        if a.task != "age":
            row["auroc12_per_class"] = classification_metrics(y, p12, LABEL_SETS[a.task])["auroc"]
        else:
            row["r2_12"] = regression_metrics(y, p12)["r2"]
        boots = {"12": b12}
        for key, p_s in arms.items():
            ms = point_metric(a.task, y, p_s)
            bs = boot_metric(a.task, y, p_s, bidx)
            boots[key] = bs
            row["delta"][key] = {"metric_subset": ms, "delta": ms - m12, "delta_boot_se": nansd(bs - b12)}
        seeds.append(row)
        preds.append(boots)
        print(f"[{label}] seed {seed}: {wall:.1f}s, {len(res.history)} epochs (best {res.best_epoch}), "
              f"12-lead {mname}={m12:.4f} (boot se {row['metric12_boot_se']:.4f}); "
              + "; ".join(f"Delta {k}={v['delta']:+.4f} (paired se {v['delta_boot_se']:.4f})"
                          for k, v in row["delta"].items()), flush=True)

    # bootstrap SE of the mean over seeds: same resamples for every seed, average, then SD
    mean12_boot = np.nanmean(np.stack([b["12"] for b in preds]), axis=0)
    out = {"label": label, "cache": str(a.cache), "task": a.task, "metric": mname, "n_test": int(len(ref_idx)),
           "n_seeds": a.seeds, "bootstrap": a.boot, "config": base.to_dict(), "baseline": baseline,
           "seeds": seeds, "total_wall_s": time.perf_counter() - t_all}
    out["metric12"] = summarise(f"{mname} (12 leads)", [s["metric12"] for s in seeds],
                                [s["metric12_boot_se"] for s in seeds], nansd(mean12_boot), a.seeds)
    out["deltas"] = {}
    for sub in subsets:
        key = leads_key(sub)
        dmean_boot = np.nanmean(np.stack([b[key] - b["12"] for b in preds]), axis=0)
        out["deltas"][key] = summarise(f"Delta {mname} ({key} - 12)", [s["delta"][key]["delta"] for s in seeds],
                                       [s["delta"][key]["delta_boot_se"] for s in seeds], nansd(dmean_boot),
                                       a.seeds)

    finish(out, leads_key(subsets[0]))
    print_run(out)
    rec = out["recommendation"]["repeats"]
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[label] = out
    path.write_text(json.dumps(allres, indent=1))
    print(f"wrote {path} [{label}]")
    print(f"RECOMMEND repeats={out['recommendation']['repeats_for_metric']} for the 12-lead {mname} ({label})")
    print(f"RECOMMEND repeats={rec} ({label}; Delta {leads_key(subsets[0])} vs 12; "
          f"vs test floor: {out['recommendation']['repeats_vs_floor']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

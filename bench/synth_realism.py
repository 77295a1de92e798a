"""Is the synthetic PTB-XL as hard as the real one, and do its signatures transfer?

In one run, resnet1d_tiny at 100 Hz, S seeds each:

1. difficulty at equal size: trained on as many synthetic records as the real sample holds
   (~350 in folds 1-8), scored on its own test fold and on a large independent synthetic test
   set; beside the same model trained and scored on the real sample (superclasses: macro AUROC;
   age: MAE and R2);
2. transfer: trained on synthetic records only (--transfer-records), scored on the real
   sample's test fold (and on all its records, none of which it saw);
3. signal statistics, synthetic against real at 500 Hz with one measuring method
   (ecgsearch.data.fiducials): heart rate, PR, QRS, QT, per-lead QRS amplitude quantiles;
4. a figure overlaying a real and a synthetic record of each superclass (bench/out/synth_realism.png).

Every figure has a two-level interval (seeds and test records resampled, ecgsearch.stats), the
uncertainty that dominates a 50-record test fold. Last lines:
`RATIO synthetic / real AUROC at equal size: X` and `TRANSFER superclass AUROC: Y`.

    .venv/bin/python bench/synth_realism.py --real ../shared/ptbxl-sample
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.data import load_cache, prepare, read_database, read_record, read_statements, synthesize  # noqa: E402
from ecgsearch.data.fiducials import INTERVALS, amplitude_quantiles, measure  # noqa: E402
from ecgsearch.engine import TrainConfig, predict_split, train  # noqa: E402
from ecgsearch.leads import LEADS, SUPERCLASSES  # noqa: E402
from ecgsearch.stats import paired_interval  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
ALL_FOLDS = {"train": [1, 2, 3, 4, 5, 6, 7, 8], "val": [9], "test": list(range(1, 11))}


def fit_predict(cache: Path, task: str, seed: int, epochs: int, evals: dict) -> dict:
    """Train once; (y, p) on each evaluation {name: (cache, splits or None)}."""
    cfg = TrainConfig(model="resnet1d_tiny", task=task, epochs=epochs, seed=seed, bootstrap=0,
                      early_stop_patience=max(4, epochs // 3))
    with tempfile.TemporaryDirectory() as td:
        res = train(cfg, str(cache), out_dir=td)
        out = {}
        for name, (data, splits) in evals.items():
            _, y, p = predict_split(res.state, str(data), "test", splits=splits)
            out[name] = (np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64))
    return out


def summarise(metric: str, ys: list, ps: list, n_boot: int) -> dict:
    y = ys[0]
    if any(not np.array_equal(y, v) for v in ys):
        raise RuntimeError("seeds scored different records")
    iv = paired_interval(metric, y, np.stack(ps), combine="mean", n_boot=n_boot)
    return {"value": iv.value, "ci": list(iv.ci), "ci_records": list(iv.ci_records),
            "per_seed": iv.per_seed, "seed_sd": iv.seed_sd, "n": iv.n_records}


def fmt(s: dict, d: int = 3) -> str:
    return f"{s['value']:.{d}f} [{s['ci'][0]:.{d}f}, {s['ci'][1]:.{d}f}]"


def signal_stats(root: Path, n: int, fs: int = 500) -> dict:
    db = read_database(root).head(n)
    col = "filename_hr" if fs == 500 else "filename_lr"
    rows = [measure(read_record(root / rel, fs)[0], fs, waves=True) for rel in db[col]]
    iv = {k: np.array([r[k] for r in rows], dtype=float) for k in INTERVALS}
    q = {k: (np.nanquantile(v, [0.25, 0.5, 0.75]).tolist() if np.isfinite(v).any() else [math.nan] * 3)
         for k, v in iv.items()}
    found = {k: float(np.isfinite(v).mean()) for k, v in iv.items()}
    return {"n": len(rows), "intervals_q25_50_75": q, "found": found, "qrs_pp_mv_q05_25_50_75_95":
            amplitude_quantiles(rows)}


def figure(real_root: Path, syn_root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pick(root: Path) -> dict:
        db, st = read_database(root), read_statements(root)
        from ecgsearch.data import label_matrix
        lab = label_matrix(db, st, "superclass")
        out = {}
        for k, c in enumerate(SUPERCLASSES):
            only = np.flatnonzero((lab[:, k] == 1) & (lab.sum(1) == 1))
            if only.size:
                out[c] = db.filename_hr.iloc[int(only[0])]
        return out

    real, syn = pick(real_root), pick(syn_root)
    show = ("II", "V1", "V5")
    fig, axes = plt.subplots(len(SUPERCLASSES), len(show), figsize=(12, 11), sharex=True)
    t = np.arange(1250) / 500
    for i, c in enumerate(SUPERCLASSES):
        for root, rel, colour, lab in ((real_root, real.get(c), "k", "real"), (syn_root, syn.get(c), "tab:red", "synthetic")):
            if rel is None:
                continue
            x = read_record(root / rel, 500)[0].T
            # Align on the first QRS after 0.5 s (all leads' summed slope above half its
            # maximum) so the two records' beats start together.
            e = np.abs(np.diff(x, axis=0)).sum(axis=1)
            r0 = 250 + int(np.flatnonzero(e[250:] > 0.5 * e.max())[0])
            seg = x[max(r0 - 250, 0):max(r0 - 250, 0) + 1250]
            for j, ld in enumerate(show):
                ax = axes[i, j]
                v = seg[:, LEADS.index(ld)]
                ax.plot(t[:v.size], v - np.median(v), colour, lw=0.8, label=lab if j == 0 else None)
                ax.set_title(f"{c} - {ld}", fontsize=9)
        axes[i, 0].set_ylabel("mV")
        axes[i, 0].legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("s")
    fig.suptitle("real PTB-XL sample (black) and synthetic (red), one record per superclass, 500 Hz")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=os.environ.get("ECGSEARCH_PTBXL_SAMPLE", "../shared/ptbxl-sample"))
    ap.add_argument("--realism", default="ptbxl")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--transfer-records", type=int, default=2000)
    ap.add_argument("--big-test", type=int, default=2000, help="records of the independent synthetic test set")
    ap.add_argument("--stats-records", type=int, default=300)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--work", default=None, help="keep data here (default: a temporary folder)")
    a = ap.parse_args()
    real_root = Path(a.real)
    if not (real_root / "ptbxl_database.csv").is_file():
        print(f"SKIP: no PTB-XL sample at {real_root} (give --real or set ECGSEARCH_PTBXL_SAMPLE)")
        return 0
    t_all = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="synth_realism_"))
    work.mkdir(parents=True, exist_ok=True)
    n_real = len(read_database(real_root))
    c_real = work / "real100"
    if not c_real.exists():
        prepare(real_root, c_real, 100)
    # As many synthetic training records as the real sample has (folds 1-8 hold ~80 %).
    n_train_real = len(load_cache(c_real).split_indices("train"))
    sets = {"small": (int(round(n_train_real / 0.8)), 101, (62.0, 17.0)),
            "transfer": (a.transfer_records, 202, (62.0, 17.0)),
"bigtest": (a.big_test, 303, (62.0, 17.0))}
    caches, rates = {}, []
    for name, (n, seed, (am, asd)) in sets.items():
        root, c = work / f"syn_{name}", work / f"syn_{name}100"
        if not c.exists():
            with threadpool_limits(1):  # "one core", as the generation goal is stated
                res = synthesize(root, n, seed=seed, fs="100", realism=a.realism, age_mean=am, age_sd=asd)
            rates.append((n, res["records_per_s"]))
            prepare(root, c, 100)
        caches[name] = c
    syn500 = work / "syn500"
    if not (syn500 / "ptbxl_database.csv").exists():
        synthesize(syn500, a.stats_records, seed=404, fs="500", realism=a.realism)
    n_train = len(load_cache(caches["small"]).split_indices("train"))

    rows: dict[str, dict] = {}
    for task, metrics in (("superclass", ("macro_auroc",)), ("age", ("mae", "r2"))):
        acc: dict[str, tuple[list, list]] = {}
        for seed in a.seeds:
            runs = {
                "real": fit_predict(c_real, task, seed, a.epochs, {"real": (c_real, None)}),
                "synthetic": fit_predict(caches["small"], task, seed, a.epochs,
                                         {"synthetic": (caches["small"], None), "synthetic_big": (caches["bigtest"], ALL_FOLDS)}),
                "transfer": fit_predict(caches["transfer"], task, seed, max(10, a.epochs - 5),
                                        {"transfer": (c_real, None), "transfer_all": (c_real, ALL_FOLDS)}),
            }
            for res in runs.values():
                for name, (y, p) in res.items():
                    acc.setdefault(name, ([], []))
                    acc[name][0].append(y)
                    acc[name][1].append(p)
            print(f"  {task} seed {seed} done ({time.perf_counter() - t_all:.0f} s)", flush=True)
        for name, (ys, ps) in acc.items():
            rows.setdefault(name, {})
            for m in metrics:
                rows[name][f"{task}_{m}"] = summarise(m, ys, ps, a.boot)
            y, p = ys[0], np.mean(ps, axis=0)
            if task == "superclass":
                from ecgsearch.metrics import auroc_per_class
                rows[name]["per_class_auroc_of_mean_output"] = dict(zip(SUPERCLASSES, auroc_per_class(y, p).tolist()))
            else:
                y, p = y.ravel(), p.ravel()
                rows[name]["age_bias_y"] = float(np.mean(p - y))
                rows[name]["age_pearson_r"] = float(np.corrcoef(y, p)[0, 1])
                rows[name]["age_mean_true"] = float(np.mean(y))
    real_stats, syn_stats = signal_stats(real_root, a.stats_records), signal_stats(syn500, a.stats_records)
    OUT.mkdir(exist_ok=True)
    figure(real_root, syn500, OUT / "synth_realism.png")

    S = len(a.seeds)
    print(f"\n== difficulty and transfer: resnet1d_tiny, 100 Hz, {S} seeds (0..{S - 1}), {a.epochs} epochs; "
          f"value = mean over seeds [two-level 95% CI: seeds and test records resampled]")
    label = {"real": f"real sample: trained on its {n_train_real} train records, its test fold",
             "synthetic": f"synthetic ({a.realism}): trained on {n_train}, its own test fold",
             "synthetic_big": f"synthetic ({a.realism}): same models, {a.big_test} independent records",
             "transfer": f"transfer: trained on {int(0.8 * a.transfer_records)} synthetic, real test fold",
             "transfer_all": "transfer: same models, all real records",}
    print(f"{'':<62} {'superclass AUROC':<24} {'age MAE (y)':<22} age R2")
    for name, r in rows.items():
        print(f"{label[name]:<62} {fmt(r['superclass_macro_auroc']):<24} {fmt(r['age_mae'], 1):<22} "
              f"{fmt(r['age_r2'], 2)}   (n={r['superclass_macro_auroc']['n']}, seed SD "
              f"{r['superclass_macro_auroc']['seed_sd']:.3f})")
    print("per-class AUROC (the seeds' mean output) and age bias (mean predicted - true) / Pearson r:")
    for name, r in rows.items():
        pc = " ".join(f"{c} {v:.2f}" for c, v in r["per_class_auroc_of_mean_output"].items())
        print(f"  {name:<14} {pc}   age bias {r['age_bias_y']:+.1f} y (true mean {r['age_mean_true']:.1f}), "
              f"r {r['age_pearson_r']:.2f}")
    print(f"\n== signal statistics at 500 Hz, {a.stats_records} records each, median [IQR] (found)")
    for k in INTERVALS:
        rq, sq = real_stats["intervals_q25_50_75"][k], syn_stats["intervals_q25_50_75"][k]
        print(f"  {k:<8} real {rq[1]:6.1f} [{rq[0]:.1f}, {rq[2]:.1f}] ({real_stats['found'][k]:.0%})   "
              f"synthetic {sq[1]:6.1f} [{sq[0]:.1f}, {sq[2]:.1f}] ({syn_stats['found'][k]:.0%})")
    print("  QRS peak-to-peak (mV), quantiles 5/25/50/75/95, real | synthetic")
    for ld in LEADS:
        r, s = real_stats["qrs_pp_mv_q05_25_50_75_95"][ld], syn_stats["qrs_pp_mv_q05_25_50_75_95"][ld]
        print(f"  {ld:<4} " + " ".join(f"{v:4.2f}" for v in r) + "  |  " + " ".join(f"{v:4.2f}" for v in s))
    if rates:
        n_big, r_big = max(rates)
        print(f"\ngeneration at 100 Hz, one thread: {r_big:.0f} records/s on {n_big} records (goal >= 200); "
              + ", ".join(f"{r:.0f}/s on {n}" for n, r in rates) + " (small sets carry the fixed start-up cost)")
    print(f"figure: {OUT / 'synth_realism.png'}; total {time.perf_counter() - t_all:.0f} s")

    real_auc, syn_auc = rows["real"]["superclass_macro_auroc"], rows["synthetic_big"]["superclass_macro_auroc"]
    d = syn_auc["value"] - real_auc["value"]
    half = math.hypot((real_auc["ci"][1] - real_auc["ci"][0]) / 2, (syn_auc["ci"][1] - syn_auc["ci"][0]) / 2)
    dm = rows["synthetic_big"]["age_mae"]["value"] - rows["real"]["age_mae"]["value"]
    hm = math.hypot(*[(rows[k]["age_mae"]["ci"][1] - rows[k]["age_mae"]["ci"][0]) / 2 for k in ("real", "synthetic_big")])
    tr, tr2 = rows["transfer"]["superclass_macro_auroc"], rows["transfer"]["age_r2"]

    def verdict(ok: bool, lo: float, hi: float, goal_lo: float, goal_hi: float) -> str:
        sure = goal_lo <= lo and hi <= goal_hi if ok else (hi < goal_lo or lo > goal_hi)
        return ("met" if ok else "NOT met") + ("" if sure else " (within noise: the interval crosses the goal)")

    print(f"GOAL synthetic - real superclass AUROC within +-0.05: {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}] "
          f"{verdict(abs(d) <= 0.05, d - half, d + half, -0.05, 0.05)}")
    print(f"GOAL synthetic - real age MAE within +-2 y: {dm:+.1f} [{dm - hm:+.1f}, {dm + hm:+.1f}] "
          f"{verdict(abs(dm) <= 2, dm - hm, dm + hm, -2, 2)}")
    print(f"GOAL transfer superclass AUROC >= 0.75: {fmt(tr)} {verdict(tr['value'] >= 0.75, *tr['ci'], 0.75, 1)}")
    print(f"GOAL transfer age R2 > 0.2: {fmt(tr2, 2)} {verdict(tr2['value'] > 0.2, *tr2['ci'], 0.2, 1)}")
    (OUT / "synth_realism.json").write_text(json.dumps(
        {"settings": vars(a), "rows": rows, "signal_stats": {"real": real_stats, "synthetic": syn_stats},
         "generation_records_per_s": rates}, indent=1, default=float) + "\n")
    print(f"RATIO synthetic / real AUROC at equal size: {syn_auc['value'] / real_auc['value']:.3f}")
    print(f"TRANSFER superclass AUROC: {tr['value']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

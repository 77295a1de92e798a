"""`make demo`: the whole pipeline on the embedded synthetic default.

Synthesise a PTB-XL-shaped dataset with planted informative leads (the label information
lives in V2 and AVL only), prepare the cache, train a 12-lead classifier, tune ML-ResNet with
Ray Tune + Optuna, run Recursive Lead Elimination as parallel Ray trials (every unit trained
with 3 seeds, each step scored by masking one subset-lead-dropout model) down to 2 leads, and
rebuild 12 leads from the kept set. The search ends with its answer: the smallest lead set
on the path that is non-inferior to 12 leads on the test fold. Everything is logged to one
sqlite MLflow store under the output folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ecgsearch.cli import main as cli

PLANTED = "V2,AVL"
# Sizes of each step: the full demo, and --quick (the test suite's end-to-end run of the same
# pipeline; shorter signals and budgets, the same commands).
SIZES = {"full": {"records": 1200, "train_epochs": 15, "trials": 4, "tune_epochs": 4, "rle_epochs": 20,
                  "patience": 5, "recon_model": "uresnet_tiny", "recon_epochs": 6, "extra": []},
         "quick": {"records": 480, "train_epochs": 3, "trials": 2, "tune_epochs": 2, "rle_epochs": 12,
                   "patience": 4, "recon_model": "uresnet_tiny", "recon_epochs": 1,
                   "extra": ["--set", "n_samples=512"]}}


def run(step: str, argv: list[str]) -> None:
    print(f"\n=== {step}: ecgsearch {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"demo step {step!r} failed with exit code {rc}")
    print(f"--- {step} done in {time.perf_counter() - t0:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--records", type=int, help="synthetic records (default 1200; 480 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="data and training seed")
    ap.add_argument("--repeats", type=int, default=3, help="training seeds per search unit")
    ap.add_argument("--quick", action="store_true", help="small sizes (the test suite's run of the demo)")
    args = ap.parse_args(argv)
    z = SIZES["quick" if args.quick else "full"]
    records = args.records or z["records"]
    out = Path(args.out).resolve()
    root, cache = out / "ptbxl-synth", out / "cache100"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    fast = ["--set", "threads=1", "--set", "bootstrap=200", "--set", f"seed={args.seed}"]

    run("synthesise", ["data", "synth", "--out", str(root), "--records", str(records), "--seed",
                       str(args.seed), "--fs", "100", "--enrich", "--informative-leads", PLANTED])
    run("prepare", ["data", "prepare", "--root", str(root), "--out", str(cache), "--fs", "100"])
    run("info", ["data", "info", str(cache)])
    run("train 12-lead ResNet", ["train", "--data", str(cache), "--model", "resnet1d_tiny", "--task", "rhythm",
                                 "--epochs", str(z["train_epochs"]), "--out", str(out / "resnet12"),
                                 "--set", "lr=0.003", "--set", "batch_size=32", "--tracking-uri", uri, *fast])
    run("tune ML-ResNet", ["tune", "--data", str(cache), "--model", "mlresnet_tiny", "--task", "rhythm",
                           "--trials", str(z["trials"]), "--epochs", str(z["tune_epochs"]), "--out", str(out / "study"),
                           "--tracking-uri", uri, *z["extra"]])
    run("lead elimination", ["rle", "--data", str(cache), "--task", "rhythm", "--model", "mlresnet_tiny",
                             "--mode", "eval", "--min-leads", "2", "--from-study", str(out / "study"),
                             "--repeats", str(args.repeats), "--epochs", str(z["rle_epochs"]),
                             "--patience", str(z["patience"]), *z["extra"],
                             "--set", "bootstrap=500", "--set", f"seed={args.seed}", "--tracking-uri", uri,
                             "--out", str(out / "rle")])
    rle = json.loads((out / "rle" / "rle.json").read_text())
    kept = rle["kept"]
    run("reconstruct 12 leads", ["reconstruct", "--data", str(cache), "--leads", ",".join(kept),
                                 "--classifier", str(out / "resnet12" / "model.ckpt"), "--model", z["recon_model"],
                                 "--epochs", str(z["recon_epochs"]), "--tracking-uri", uri,
                                 "--out", str(out / "reconstruct")])
    ok = set(PLANTED.split(",")) <= set(kept)
    print(f"\nplanted informative leads: {PLANTED}; RLE kept: {','.join(kept)} "
          f"({'both planted leads kept' if ok else 'A PLANTED LEAD WAS LOST'})")
    print(f"answer: {rle['answer_line']}")
    print(f"outputs in {out}; browse runs with:\n  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Subcommands: `ecgsearch data synth | prepare | info`."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("data", help="synthetic PTB-XL, cache preparation and cache summaries")
    dsub = p.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="write a synthetic PTB-XL (exact PTB-XL layout)")
    s.add_argument("--out", required=True, help="output folder (new, empty or an earlier synth)")
    s.add_argument("--records", type=int, default=1000, help="number of records (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fs", choices=("100", "500", "both"), default="100",
                   help="which record folders to write (default 100)")
    s.add_argument("--informative-leads", default=None, metavar="L1,L2",
                   help="planted mode: label information only in these leads")
    s.add_argument("--enrich", action="store_true",
                   help="raise each of the six rhythm/conduction codes to 15%% prevalence")
    s.add_argument("--rhythm-prevalence", type=float, default=None, metavar="P",
                   help="prevalence of each of the six codes (implies --enrich)")
    s.add_argument("--realism", choices=("ptbxl", "clean"), default="ptbxl",
                   help="ptbxl (default): as hard as real PTB-XL (label noise, partial and co-occurring "
                        "signatures, patient geometry, artifacts); clean: textbook signatures, exact labels")
    s.add_argument("--realism-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one realism setting (docs/SYNTHETIC.md), e.g. missed=0.1; repeatable")
    s.add_argument("--age-mean", type=float, default=62.0, help="population mean age (default 62, PTB-XL)")
    s.add_argument("--age-sd", type=float, default=17.0, help="population age SD (default 17, PTB-XL)")
    s.set_defaults(func=_synth)

    q = dsub.add_parser("prepare", help="convert a PTB-XL root into a columnar cache")
    q.add_argument("--root", required=True, help="PTB-XL root (with ptbxl_database.csv)")
    q.add_argument("--out", required=True, help="cache folder or pyarrow.fs URI (s3://, gs://)")
    q.add_argument("--fs", choices=("100", "500"), required=True, help="sampling rate to cache")
    q.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    q.add_argument("--skip-bad", action="store_true",
                   help="convert the good records, list bad ones in skipped.csv (exit 0)")
    q.add_argument("--rhythm-threshold", type=float, default=0.0,
                   help="minimum SCP likelihood for a rhythm label (default 0: any statement)")
    q.add_argument("--superclass-threshold", type=float, default=0.0,
                   help="minimum SCP likelihood for a superclass label (default 0)")
    q.add_argument("--target-fs", type=int, metavar="HZ",
                   help="write the cache at the model's rate (with --n-samples), resampled once here "
                        "instead of in every batch: e.g. --fs 500 --target-fs 400 --n-samples 4096 (Ribeiro)")
    q.add_argument("--n-samples", type=int, help="the model's input length for --target-fs (centred zero padding)")
    q.set_defaults(func=_prepare)

    i = dsub.add_parser("info", help="records per fold, label prevalence, ages, skipped records")
    i.add_argument("cache", help="cache folder or URI")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_info)


def _synth(args: argparse.Namespace) -> int:
    from ecgsearch.data.realism import get_realism, with_overrides
    from ecgsearch.data.synth import synthesize
    from ecgsearch.engine.config import coerce_value
    realism = get_realism(args.realism)
    if args.realism_set:
        kv = {}
        for pair in args.realism_set:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--realism-set wants NAME=VALUE, got {pair!r}")
            kv[name.strip()] = coerce_value(value)
        realism = with_overrides(realism, **kv)
    res = synthesize(args.out, args.records, seed=args.seed, fs=args.fs,
                     informative_leads=args.informative_leads,
                     enrich=args.enrich, rhythm_prevalence=args.rhythm_prevalence, realism=realism,
                     age_mean=args.age_mean, age_sd=args.age_sd)
    planted = f", planted in {','.join(res['informative_leads'])}" if res["informative_leads"] else ""
    print(f"wrote {res['n_records']} synthetic records ({args.fs} Hz, realism {res['realism']}{planted}) to {res['out']} "
          f"in {res['seconds']:.1f} s ({res['records_per_s']:.0f} records/s)")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ecgsearch.data.cache import prepare
    man = prepare(args.root, args.out, int(args.fs), workers=args.workers,
                  skip_bad=args.skip_bad, rhythm_threshold=args.rhythm_threshold,
                  superclass_threshold=args.superclass_threshold, target_fs=args.target_fs,
                  n_samples=args.n_samples)
    what = "unchanged source, cache kept" if man["reused"] else "prepared"
    geo = man.get("geometry")
    print(f"{what}: {args.out}: {man['n_records']} records at {man['fs']} Hz, "
          f"{man['n_samples']} samples, {man['dtype']}"
          + (f" (model geometry: resampled once from {geo['source_fs']} Hz x {geo['source_n_samples']})"
             if geo else ""))
    if geo and geo["clipped"]:
        print(f"WARNING: {len(geo['clipped'])} record(s) had resampled samples beyond int16's range, clipped "
              f"(listed in manifest.json geometry.clipped): "
              + ", ".join(f"ecg_id {c['ecg_id']} ({c['samples']} samples)" for c in geo["clipped"][:10]))
    if man["skipped"]:
        print(f"skipped {len(man['skipped'])} bad record(s), listed in "
              f"{args.out.rstrip('/')}/skipped.csv:")
        for s in man["skipped"][:20]:
            print(f"  ecg_id {s['ecg_id']} ({s['path']}): {s['reason']}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ecgsearch.data.cache import cache_info
    info = cache_info(args.cache)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    folds = sorted(info["folds"], key=int)
    print(f"{info['path']}: {info['n_records']} records, {info['fs']} Hz, {info['n_samples']} "
          f"samples, {info['dtype']} (gain {info['gain']:g}), leads {' '.join(info['leads'])}")
    print(f"{'fold':<18}" + " ".join(f"{f:>6}" for f in folds) + "   total")
    print(f"{'records':<18}" + " ".join(f"{info['folds'][f]:>6}" for f in folds)
          + f"  {info['n_records']:>6}")
    for label, total in info["labels"].items():
        per = [info["labels_per_fold"][f][label] / max(1, info["folds"][f]) for f in folds]
        print(f"{label:<18}" + " ".join(f"{100 * p:5.1f}%" for p in per)
              + f"  {100 * total / max(1, info['n_records']):5.1f}%")
    a = info["age"]
    if a["count"]:
        print(f"age: {a['count']} known, {a['missing']} missing, mean {a['mean']:.1f}, "
              f"range {a['min']:g}-{a['max']:g}; {a['n_mapped_300']} coded 300 (>89) read as 90")
    else:
        print(f"age: none known ({a['missing']} missing)")
    print(f"skipped: {info['skipped']} record(s)")
    for s in info["skipped_records"][:20]:
        print(f"  ecg_id {s['ecg_id']} ({s['path']}): {s['reason']}")
    return 0

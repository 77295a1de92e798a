"""Ray job: a lead search on a running cluster, optionally followed by the exhaustive check.

Submit from a machine that can reach the head node's dashboard (127.0.0.1 when tunnelled):

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/rle_job.py --data /shared/ptbxl-cache-500 --task rhythm --model mlresnet \\
        --mode retrain --from-study /shared/studies/mlresnet-rhythm --out /shared/rle/rhythm \\
        --tracking-uri http://127.0.0.1:5000 --check-k 3

Every argument except --check-k goes to `ecgsearch rle` unchanged. The output folder and
the cache must be on storage every node can read (trials write checkpoints there).
Resubmitting with --resume continues a killed job without redoing finished candidates.
`--check-k K` then scores every K-subset of the start set (`ecgsearch subsets --k K --rle OUT`)
with the same data, task, model, mode and hyperparameters, into OUT/subsets-kK.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.cli import main as cli_main  # noqa: E402

# Options `subsets` shares with `rle` (flag -> takes a value).
_SHARED = {"--data": True, "--task": True, "--model": True, "--mode": True, "--config": True,
           "--from-study": True, "--set": True, "--epochs": True, "--workers-per-trial": True,
           "--cpus-per-trial": True, "--gpus-per-trial": True, "--max-concurrent": True, "--tracking-uri": True,
           "--experiment": True, "--executor": True, "--runtime-env": True, "--no-tracking": False}


def shared_args(argv: list[str]) -> list[str]:
    """The subset of `rle` arguments that `subsets` accepts, in order."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        takes = _SHARED.get(flag)
        if takes is None:
            i += 1 + (1 if "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
                      else 0)
            continue
        out.append(argv[i])
        if takes and "=" not in argv[i]:
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out


def _known(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--check-k", type=int)
    ap.add_argument("--out", default="runs/rle")
    ap.add_argument("--start-leads")
    return ap.parse_known_args(argv)[0]


def split_args(argv: list[str]) -> tuple[list[str], int | None]:
    """(the arguments for `ecgsearch rle`, the --check-k value or None)."""
    rle_argv = [a for i, a in enumerate(argv) if a != "--check-k" and not (i and argv[i - 1] == "--check-k")
                and not a.startswith("--check-k=")]
    return rle_argv, _known(argv).check_k


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = _known(argv)
    rle_argv, _ = split_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        print("rle_job: RAY_ADDRESS is not set; running on a local Ray instance", file=sys.stderr)
    rc = cli_main(["rle", *rle_argv])
    if rc != 0 or known.check_k is None:
        return rc
    sub_out = Path(known.out) / f"subsets-k{known.check_k}"
    # Resume the check only if a previous submission got as far as starting it.
    resume = ["--resume"] if (sub_out / "state.json").exists() else []
    # The exhaustive check ranks subsets of the same pool the elimination started from.
    pool = ["--pool", known.start_leads] if known.start_leads else []
    return cli_main(["subsets", *shared_args(rle_argv), *pool, "--k", str(known.check_k), "--rle", known.out,
                     "--out", str(sub_out), *resume])


if __name__ == "__main__":
    sys.exit(main())

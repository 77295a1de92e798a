"""Ray job entry point: a hyperparameter study on a running cluster.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/tune_job.py --data /shared/ptbxl-cache --model resnet1d --task rhythm \\
        --trials 64 --workers-per-trial 2 --out /shared/studies/resnet1d-rhythm \\
        --tracking-uri http://127.0.0.1:5000

Arguments are those of `ecgsearch tune`. Ray sets RAY_ADDRESS for a submitted job, so the study
joins that cluster instead of starting its own (run by hand without it, it says so and starts
a local Ray: the same script serves a laptop). If the job is stopped or the head restarts,
submit the same command with --resume: finished trials are kept, and an interrupted trial
continues from its last epoch checkpoint.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The job's working_dir is the repository; make `ecgsearch` importable even without pip install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgsearch.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not os.environ.get("RAY_ADDRESS"):
        print("tune_job: RAY_ADDRESS is not set; running on a local Ray instance", file=sys.stderr)
    return cli_main(["tune", *argv])


if __name__ == "__main__":
    sys.exit(main())

"""Lead search: recursive lead elimination, exhaustive subset search, reconstruction.

- `rle`: the greedy algorithm with a pluggable scorer (pure, deterministic).
- `subsets`: k-subset enumeration, ranking, placing RLE's choice.
- `candidates`: work units (train / drop a lead / test); `executors`: how batches of them run
  (parallel Ray Tune trials, or one by one in-process).
- `context`: settings and memoised execution; `state`: the resumable memo.
- `pipeline`: `run_rle` and `run_subsets` end to end; `reconstruct`: U-ResNet rebuild.
- `report`, `plots`: rle.json + markdown, figures (MLflow runs: `ecgsearch.tracking`).
See docs/LEAD_SEARCH.md.
"""

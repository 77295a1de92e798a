"""Markdown for a reconstruction result (`ecgsearch reconstruct`, `rle --reconstruct`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ecgsearch.search.report import _ci_cell, _fmt


def reconstruction_markdown(rec: Mapping[str, Any], heading: str = "#") -> str:
    metric = rec["classifier_metric"]
    lines = [f"{heading} Reconstruction from {rec['leads_key']}", "",
             f"U-ResNet rebuilds all 12 leads from {rec['leads_key']}; test fold, mean r "
             f"{_fmt(rec['reconstruction']['mean_r'], 3)}, mean RMSE {_fmt(rec['reconstruction']['mean_rmse'], 3)} mV.",
             "", "| lead | r | RMSE (mV) |", "|---|---:|---:|"]
    for lead, r in rec["reconstruction"]["r"].items():
        lines.append(f"| {lead} | {_fmt(r, 3)} | {_fmt(rec['reconstruction']['rmse'][lead], 3)} |")
    lines += ["", f"12-lead classifier `{rec['classifier']}` on the test fold ({metric}, 95% CI):", "",
              "| input | " + metric + " |", "|---|---:|"]
    labels = {"true_12": "true 12 leads", "rebuilt_12": "rebuilt 12 leads",
              "kept_zeroed": f"{rec['leads_key']} only, other leads zeroed"}
    for key, label in labels.items():
        lines.append(f"| {label} | {_ci_cell(rec['classifier_test'][key], metric)} |")
    return "\n".join(lines) + "\n"

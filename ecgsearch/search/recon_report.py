"""Markdown for a reconstruction result (`ecgsearch reconstruct`, `rle --reconstruct`).

The headline numbers and the main table cover the rebuilt leads only. The input leads
are listed in a table of their own, each marked "(input)": they pass through the
U-ResNet almost unchanged, and an r of 1.000 next to the rebuilt leads would read as
reconstruction skill.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ecgsearch.search.report import _ci_cell, _fmt


def _cell(value: Any, ci: Sequence[Any] | None) -> str:
    """"0.912 [0.890, 0.930]", or the bare value when there is no (complete) CI."""
    if not ci or any(b is None for b in ci):
        return _fmt(value, 3)
    return f"{_fmt(value, 3)} [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]"


def _ci(m: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    return (m.get("ci") or {}).get(key)


def _lead_rows(m: Mapping[str, Any], mark: str = "") -> list[str]:
    return [f"| {lead}{mark} | {_cell(r, _ci(m, f'r/{lead}'))} | {_cell(m['rmse'][lead], _ci(m, f'rmse/{lead}'))} |"
            for lead, r in m["r"].items()]


def _summary(m: Mapping[str, Any]) -> str:
    return (f"mean r {_cell(m['mean_r'], _ci(m, 'mean_r'))}, "
            f"mean RMSE {_cell(m['mean_rmse'], _ci(m, 'mean_rmse'))} mV")


def reconstruction_markdown(rec: Mapping[str, Any], heading: str = "#") -> str:
    metric = rec["classifier_metric"]
    m = rec["reconstruction"]
    built = ",".join(m["rebuilt_leads"])
    lines = [f"{heading} Reconstruction from {rec['leads_key']}", "",
             f"U-ResNet rebuilds {len(m['rebuilt_leads'])} leads ({built}) from {rec['leads_key']}; test fold, "
             f"{m['n']} records, 95% CIs. Averaged over the rebuilt leads only: {_summary(m)}."]
    pre = m.get("precordial")
    lines.append("")   # its own paragraph: markdown would run the two sentences together
    if pre:
        lines.append(f"Rebuilt precordial leads ({','.join(pre['r'])}): {_summary(pre)}.")
    else:
        lines.append("No precordial lead was rebuilt: V1-V6 were all inputs.")
    lines += ["", "| rebuilt lead | r | RMSE (mV) |", "|---|---:|---:|", *_lead_rows(m)]
    lines += ["", f"Input leads ({rec['leads_key']}): measured, so not reconstruction skill and not in the means "
              "above; the U-ResNet's copy of them, for reference only:", "",
              "| input lead | r | RMSE (mV) |", "|---|---:|---:|", *_lead_rows(m["inputs"], " (input)")]
    lines += ["", f"12-lead classifier `{rec['classifier']}` on the test fold ({metric}, 95% CI):", "",
              "| input | " + metric + " |", "|---|---:|"]
    labels = {"true_12": "true 12 leads", "rebuilt_12": "rebuilt 12 leads",
              "kept_zeroed": f"{rec['leads_key']} only, other leads zeroed"}
    for key, label in labels.items():
        lines.append(f"| {label} | {_ci_cell(rec['classifier_test'][key], metric)} |")
    return "\n".join(lines) + "\n"

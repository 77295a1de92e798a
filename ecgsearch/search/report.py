"""rle.json and its markdown summary.

`rle.json` is the single machine-readable result of a lead search; the markdown and the
plots are rendered from it alone, so they can be regenerated after the fact.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecgsearch.search.state import write_json


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def metric_ci(metrics: Mapping[str, Any], name: str) -> tuple[float, float, float]:
    """(value, lo, hi) of metric `name` from an evaluate() dict; CI bounds NaN when absent."""
    if name not in metrics:
        raise KeyError(f"metric {name!r} not in test metrics (have {', '.join(sorted(metrics))})")

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    lo, hi = (metrics.get("ci") or {}).get(name, (None, None))
    return num(metrics[name]), num(lo), num(hi)


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci_cell(metrics: Mapping[str, Any], name: str) -> str:
    v, lo, hi = metric_ci(metrics, name)
    if math.isnan(lo):
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def write_rle(out: str | Path, result: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write OUT/rle.json and OUT/rle.md; returns both paths."""
    out = Path(out)
    data = clean(result)
    json_path = write_json(out / "rle.json", data)
    md_path = out / "rle.md"
    md_path.write_text(rle_markdown(data))
    return json_path, md_path


def rle_markdown(r: Mapping[str, Any]) -> str:
    s = r["settings"]
    metric, better = s["metric"], "higher" if s["metric_mode"] == "max" else "lower"
    lines = [f"# Recursive lead elimination: {s['task']} with {s['model']} ({s['mode']} mode)", "",
             f"- data `{s['data']}`; start leads {','.join(s['start_leads'])}; down to {s['min_leads']} leads",
             f"- candidates scored on the validation fold by `{metric}` ({better} is better); "
             "test-fold metrics with 95% bootstrap CIs",
             f"- **kept leads: {','.join(r['kept'])}**; elimination order: {' > '.join(r['elimination_order'])}",
             "", "## Elimination path", "",
             "| step | from (n) | removed | score after removal | runner-up | all candidates (removed: score) |",
             "|---:|---|---|---:|---|---|"]
    sign = 1 if s["metric_mode"] == "max" else -1
    for st in r["steps"]:
        ranked = sorted(st["candidates"],
                        key=lambda c: (c["score"] is None, -sign * (c["score"] or 0.0)))
        runner = next((c for c in ranked if c["removed"] != st["removed"]), None)
        runner_txt = f"{runner['removed']} ({_fmt(runner['score'])})" if runner else ""
        allc = ", ".join(f"{c['removed']}: {_fmt(c['score'], 3)}" for c in st["candidates"])
        tie = f" (tie with {','.join(st['tied'])})" if st.get("tied") else ""
        lines.append(f"| {st['step']} | {st['n_leads']} | {st['removed']}{tie} | {_fmt(st['score'])} | "
                     f"{runner_txt} | {allc} |")
    extra = [m for m in s.get("report_metrics", []) if m != metric]
    head = f"| leads | n | {metric} (95% CI) | " + " | ".join(extra) + (" |" if extra else "")
    sep = "|---|---:|---:|" + "---:|" * len(extra)

    def row(label: str, entry: Mapping[str, Any]) -> str:
        test = entry["test"]
        cells = [f"{label}", str(entry["n_leads"]), _ci_cell(test, metric)]
        cells += [_ci_cell(test, m) if m in test else "n/a" for m in extra]
        return "| " + " | ".join(cells) + " |"

    lines += ["", "## Test fold by number of leads", "", head, sep]
    for entry in r["by_n_leads"]:
        lines.append(row(entry["leads_key"], entry))
    if r.get("baselines"):
        lines += ["", "## Baselines (PhysioNet/CinC Challenge 2021 reduced sets)", "", head, sep]
        for entry in r["baselines"]:
            lines.append(row(f"{entry['name']}: {entry['leads_key']}", entry))
    rec = r.get("reconstruction")
    if rec:
        from ecgsearch.search.recon_report import reconstruction_markdown

        lines += ["", reconstruction_markdown(rec, heading="##")]
    lines += ["", "Plots: `metric_vs_leads.png`, `elimination_order.png`."]
    return "\n".join(lines) + "\n"

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


def _iv(iv: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """'value [lo, hi]' of an interval dict from ecgsearch.stats (two-level CI)."""
    if not iv:
        return "n/a"
    f = (lambda v: "n/a" if v is None else f"{v:+.{digits}f}") if signed else (lambda v: _fmt(v, digits))
    ci = iv.get("ci") or [None, None]
    return f"{f(iv.get('value', iv.get('delta')))} [{f(ci[0])}, {f(ci[1])}]"


def _seed_cell(val: Mapping[str, Any]) -> str:
    sd = val.get("seed_sd")
    return _fmt(val["score"]) + (f" ± {_fmt(sd)}" if sd is not None else "")


def rle_markdown(r: Mapping[str, Any]) -> str:
    s = r["settings"]
    metric, ni, better = s["metric"], s["ni_metric"], "higher" if s["metric_mode"] == "max" else "lower"
    mode = s["mode"] + (f", {s['eval_model']} model" if s.get("eval_model") else "")
    lines = [f"# Recursive lead elimination: {s['task']} with {s['model']} ({mode} mode)", "",
             f"**Answer: {r['answer_line']}.**", ""]
    lines += [f"> **Warning:** {w}" for w in r.get("warnings", [])]
    if r.get("warnings"):
        lines.append("")
    reps = s["repeats"]
    lines += [f"- data `{s['data']}`; start leads {','.join(s['start_leads'])}; down to {s['min_leads']} leads",
              f"- every model trained with {reps} seed(s) {s['seeds']}; epoch budget {s['epochs']} with early stopping "
              f"after {s['patience']} epochs without improvement (the search's own settings)",
              f"- candidates scored on the validation fold by `{metric}` ({better} is better), mean over seeds; each "
              "step's margin (winner minus runner-up) has a paired 95% CI; a CI that includes 0 is *not decisive*",
              f"- test figures: the seed ensemble (mean of the {reps} models' outputs); 95% CIs from a paired two-level "
              "bootstrap that resamples seeds and records" + ("" if reps > 1 else " (records only: one seed)"),
              f"- non-inferiority: delta = {ni}(subset) - {ni}(12 leads), margin {s['margin']:g}",
              f"- kept leads: {','.join(r['kept'])}; elimination order: {' > '.join(r['elimination_order'])}", ""]
    lines += ["## Non-inferiority to 12 leads (test fold)", "",
              f"| leads | n | delta {ni} [95% CI] | records-only CI | verdict |", "|---|---:|---:|---:|---|"]
    for e in r["noninferiority"]:
        label = e["leads_key"] if "leads_key" in e else ",".join(e["leads"])
        label = f"{e['baseline']}: {label}" if e.get("baseline") else label
        rec = e.get("ci_records") or [None, None]
        lines.append(f"| {label} | {e['n_leads']} | {_iv(e, 4, True)} | [{_num(rec[0])}, {_num(rec[1])}] | "
                     f"{e['verdict']} |")
    lines += ["", "## Elimination path (validation fold)", "",
              f"| step | from (n) | removed | {metric} without it (mean ± SD over seeds) | runner-up | margin [95% CI] | "
              "decisive |", "|---:|---:|---|---:|---|---:|---|"]
    for st in r["steps"]:
        removed = next(c for c in st["candidates"] if c["removed"] == st["removed"])
        tie = f" (tie with {','.join(st['tied'])})" if st.get("tied") else ""
        margin = "n/a" if st.get("margin") is None else \
            f"{_num(st['margin'])} [{_num(st['margin_ci'][0])}, {_num(st['margin_ci'][1])}]"
        lines.append(f"| {st['step']} | {st['n_leads']} | {st['removed']}{tie} | "
                     f"{_seed_cell({'score': removed['score'], 'seed_sd': removed.get('seed_sd')})} | "
                     f"{st.get('runner_up') or ''} | {margin} | {'yes' if st.get('decisive') else '**no: within noise**'} |")
    extra = [m for m in s.get("report_metrics", []) if m != metric]
    head = f"| leads | n | {metric} [95% CI] | " + "".join(f"{m} [95% CI] | " for m in extra) + \
        "per-seed " + metric + " | macro F1 (val thresholds) | still improving |"
    sep = "|---|---:|---:|" + "---:|" * len(extra) + "---|---:|---:|"

    def row(label: str, e: Mapping[str, Any]) -> str:
        ivs = e.get("intervals", {})
        cells = [label, str(e["n_leads"]), _iv(ivs[metric], 4) if metric in ivs else _ci_cell(e["test"], metric)]
        cells += [_iv(ivs.get(m), 4) if m in ivs else _ci_cell(e["test"], m) for m in extra]
        cells.append(", ".join(_fmt(v, 3) for v in (ivs.get(metric) or {}).get("per_seed", [])))
        op = e.get("operating_points")
        cells.append(_fmt(op["macro_f1"], 3) if op else "n/a")
        tr = e.get("training", {})
        cells.append(f"{tr.get('still_improving', 0)} of {len(tr.get('runs', []))}")
        return "| " + " | ".join(cells) + " |"

    lines += ["", "## Test fold by number of leads (seed ensemble)", "", head, sep]
    lines += [row(e["leads_key"], e) for e in r["by_n_leads"]]
    if r.get("baselines"):
        lines += ["", "## Baselines (PhysioNet/CinC Challenge 2021 reduced sets)", "", head, sep]
        lines += [row(f"{b['name']}: {b['leads_key']}", b) for b in r["baselines"]]
    for nm, ls in (r.get("baselines_skipped") or {}).items():
        lines.append(f"- baseline {nm} ({','.join(ls)}) skipped: not a subset of the shared model's start leads")
    lines += _operating_points_md(r)
    rec = r.get("reconstruction")
    if rec:
        from ecgsearch.search.recon_report import reconstruction_markdown

        lines += ["", reconstruction_markdown(rec, heading="##")]
    lines += ["", "Plots: `metric_vs_leads.png` (hollow markers: reached by a step that was not decisive), "
              "`elimination_order.png`."]
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _operating_points_md(r: Mapping[str, Any]) -> list[str]:
    """Per-class F1 / sensitivity / specificity at validation-chosen thresholds, answer set and 12 leads."""
    wanted = [r.get("reference")]
    ans = r.get("answer") or {}
    if ans.get("leads"):
        key = ",".join(ans["leads"])
        wanted += [e for e in r["by_n_leads"] if e["leads_key"] == key]
    out = []
    for e in [w for w in wanted if w and w.get("operating_points")]:
        op = e["operating_points"]
        ci = op.get("ci", {})
        cell = lambda name, c: f"{_fmt(op[name][c], 3)} [{_fmt((ci.get(f'{name}/{c}') or [None])[0], 3)}, " \
            f"{_fmt((ci.get(f'{name}/{c}') or [None, None])[1], 3)}]"  # noqa: E731
        out += ["", f"## Operating points: {e['leads_key']} (thresholds F1-max on validation, applied to test)", "",
                "| class | threshold | F1 | sensitivity | specificity |", "|---|---:|---:|---:|---:|"]
        for c, t in op["thresholds"].items():
            out.append(f"| {c} | {_fmt(t, 3)} | {cell('f1', c)} | {cell('sensitivity', c)} | {cell('specificity', c)} |")
    return out

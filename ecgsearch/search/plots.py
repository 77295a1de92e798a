"""Lead-search figures, drawn from rle.json alone (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from ecgsearch.leads import LEADS  # noqa: E402
from ecgsearch.search.report import metric_ci  # noqa: E402


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _value_ci(entry: Mapping[str, Any], metric: str) -> tuple[float, float, float]:
    """(value, lo, hi): the two-level interval (seeds and records) when present, else the test CI."""
    iv = (entry.get("intervals") or {}).get(metric)
    if iv:
        return _nan(iv["value"]), _nan(iv["ci"][0]), _nan(iv["ci"][1])
    return metric_ci(entry["test"], metric)


def plot_metric_vs_leads(result: Mapping[str, Any], path: str | Path) -> Path:
    """Test metric against number of leads with its CI band; baselines as marked points.

    A lead count reached by a step that was not decisive is drawn hollow: which lead was
    removed there is within noise.
    """
    s = result["settings"]
    metric = s["metric"]
    rows = sorted(result["by_n_leads"], key=lambda e: e["n_leads"])
    xs = [e["n_leads"] for e in rows]
    vals = [_value_ci(e, metric) for e in rows]
    undecided = {st["n_leads"] - 1 for st in result.get("steps", []) if st.get("decisive") is False}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    y = [_nan(v[0]) for v in vals]
    ax.plot(xs, y, "-", color="C0", label=f"RLE ({s['mode']} mode)")
    for x, v in zip(xs, y):
        hollow = x in undecided
        ax.plot([x], [v], "o", color="C0", markerfacecolor="white" if hollow else "C0")
    if undecided:
        ax.plot([], [], "o", color="C0", markerfacecolor="white", label="step not decisive (within noise)")
    lo, hi = [_nan(v[1]) for v in vals], [_nan(v[2]) for v in vals]
    if not all(math.isnan(v) for v in lo):
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.2, label="95% CI (seeds and records)")
    for e, (v, _, _) in zip(rows, vals):
        ax.annotate(e["leads_key"] if e["n_leads"] <= 4 else "", (e["n_leads"], _nan(v)),
                    textcoords="offset points", xytext=(4, -12), fontsize=7)
    markers = "sD^vP*"
    for i, b in enumerate(result.get("baselines") or []):
        v, blo, bhi = _value_ci(b, metric)
        err = None
        if not math.isnan(blo):
            err = [[max(_nan(v) - blo, 0.0)], [max(bhi - _nan(v), 0.0)]]
        ax.errorbar([b["n_leads"] + 0.15], [_nan(v)], yerr=err, fmt=markers[i % len(markers)],
                    color=f"C{i + 1}", capsize=3, label=f"{b['name']} ({b['leads_key']})")
    ax.set_xlabel("number of leads")
    ax.set_ylabel(f"test {metric}")
    ax.set_xticks(sorted(set(xs) | {b["n_leads"] for b in result.get("baselines") or []}))
    ax.set_title(f"{s['task']}: {metric} vs leads ({s['model']}, {s.get('repeats', 1)} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_elimination_order(result: Mapping[str, Any], path: str | Path) -> Path:
    """The 12 leads in the usual 2 x 6 print layout, coloured and labelled by removal step."""
    order = list(result["elimination_order"])
    steps = list(result.get("steps", []))
    kept = set(result["kept"])
    start = set(result["settings"]["start_leads"])
    n = max(len(order), 1)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 3))
    for i, lead in enumerate(LEADS):
        row, col = divmod(i, 6)
        if lead in kept:
            color, text = "#d62728", "kept"
        elif lead in order:
            k = order.index(lead)
            color, text = cmap(0.15 + 0.8 * k / n), f"removed #{k + 1}"
            if k < len(steps) and steps[k].get("decisive") is False:
                text += " (noise)"
        else:
            color, text = "#dddddd", "not in start"
        ax.add_patch(plt.Rectangle((col, 1 - row), 0.92, 0.85, color=color))
        ax.text(col + 0.46, 1 - row + 0.55, lead, ha="center", va="center", fontsize=13,
                color="white" if lead in start else "black", weight="bold")
        ax.text(col + 0.46, 1 - row + 0.22, text, ha="center", va="center", fontsize=8,
                color="white" if lead in start else "black")
    ax.set_xlim(-0.05, 6)
    ax.set_ylim(-0.05, 2)
    ax.axis("off")
    ax.set_title("elimination order (first removed = #1; \"noise\": step not decisive); red = kept")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(result: Mapping[str, Any], out: str | Path) -> list[Path]:
    out = Path(out)
    return [plot_metric_vs_leads(result, out / "metric_vs_leads.png"),
            plot_elimination_order(result, out / "elimination_order.png")]

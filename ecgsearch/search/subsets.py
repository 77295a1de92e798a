"""Exhaustive subset search: enumerate every k-subset of a pool, rank, place RLE's choice.

Greedy elimination can miss the best subset of a size; scoring all C(n, k) subsets on
the same validation fold says by how much on the user's data. The pure parts here
(enumeration, ranking, RLE placement) carry no training, so they are unit-tested
directly; `runner.run_subsets` does the training and writes `subsets.json`.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ecgsearch.leads import LEADS, leads_key, parse_leads
from ecgsearch.search.rle import MODES, TIE_TOL

_POS = {name: i for i, name in enumerate(LEADS)}


def enumerate_subsets(pool: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """All k-subsets of `pool` in canonical lexicographic order (220 for k=3 of 12)."""
    leads = parse_leads(pool)
    if not 1 <= int(k) <= len(leads):
        raise ValueError(f"invalid setting k={k}: must be between 1 and {len(leads)}, the pool size "
                         f"({leads_key(leads)})")
    return list(itertools.combinations(leads, int(k)))


def rank_subsets(scores: Mapping[str, float], mode: str = "max") -> list[dict[str, Any]]:
    """Rank subsets (keyed by `leads_key`) best first.

    Rank is 1 + the number of subsets better by more than TIE_TOL (competition ranking),
    so tied subsets share a rank; the listing order among ties is canonical lead order.
    """
    if mode not in MODES:
        raise ValueError(f"invalid score mode {mode!r}: choose max or min")
    sign = 1.0 if mode == "max" else -1.0
    items = []
    for key, score in scores.items():
        leads = parse_leads(key)
        if leads_key(leads) != key:
            raise ValueError(f"subset key {key!r} is not in canonical form ({leads_key(leads)})")
        if score != score:  # NaN
            raise ValueError(f"subset {key} has no score (NaN); check the validation fold")
        items.append((key, leads, float(score)))
    items.sort(key=lambda t: (-sign * t[2], [_POS[x] for x in t[1]]))
    ranked = []
    for key, leads, score in items:
        better = sum(1 for _, _, s in items if sign * (s - score) > TIE_TOL)
        ranked.append({"rank": better + 1, "leads": list(leads), "leads_key": key,
                       "n_leads": len(leads), "score": score})
    return ranked


def place_subset(ranking: Sequence[dict[str, Any]], leads: Sequence[str], mode: str = "max") -> dict[str, Any]:
    """Where `leads` ranks and its gap to the best (>= 0: how much worse than the best)."""
    key = leads_key(leads)
    row = next((r for r in ranking if r["leads_key"] == key), None)
    if row is None:
        raise ValueError(f"subset {key} is not among the {len(ranking)} ranked subsets; "
                         "is it inside --pool and of size --k?")
    best = ranking[0]
    gap = best["score"] - row["score"] if mode == "max" else row["score"] - best["score"]
    return {"leads": list(row["leads"]), "leads_key": key, "rank": row["rank"], "of": len(ranking),
            "score": row["score"], "best_leads": best["leads"], "best_score": best["score"],
            "gap_to_best": gap}


def rle_choice(rle_dir: str | Path, k: int) -> tuple[str, ...]:
    """The k-lead set an RLE run kept, read from `rle_dir/rle.json`."""
    path = Path(rle_dir) / "rle.json"
    if not path.exists():
        raise FileNotFoundError(f"--rle {rle_dir}: no rle.json there (run `ecgsearch rle` first)")
    data = json.loads(path.read_text())
    sets = {len(s["leads"]): tuple(s["leads"]) for s in data["steps"]}
    kept = tuple(data["kept"])
    sets[len(kept)] = kept
    if k not in sets:
        raise ValueError(f"--rle {rle_dir}: the RLE path has no {k}-lead set "
                         f"(it covers {min(sets)}..{max(sets)} leads)")
    return parse_leads(sets[k])


def markdown(result: Mapping[str, Any], top: int = 10) -> str:
    """A short human summary of `subsets.json`."""
    s = result["settings"]
    lines = [f"# Exhaustive {s['k']}-lead subset search", "",
             f"- task `{s['task']}`, model `{s['model']}`, mode `{s['mode']}`, pool {s['pool']}",
             f"- {len(result['ranking'])} subsets scored on the validation fold by `{s['metric']}` "
             f"({'higher' if s['metric_mode'] == 'max' else 'lower'} is better)", ""]
    rle = result.get("rle")
    if rle:
        lines += [f"**RLE's choice {rle['leads_key']} ranks {rle['rank']} of {rle['of']}**, "
                  f"score {rle['score']:.4f}; the best, {','.join(rle['best_leads'])}, scores "
                  f"{rle['best_score']:.4f} (gap {rle['gap_to_best']:.4f}).", ""]
    ni = s.get("ni_metric", "")
    lines += [f"Scores: mean over {s.get('repeats', 1)} seed(s) ± their SD. delta = {ni}(subset) - {ni}(12 leads) "
              f"on the test fold (seed ensembles, paired 95% CI resampling seeds and records), margin "
              f"{s.get('margin', float('nan')):g}.", "",
              f"| rank | leads | score | delta {ni} [95% CI] | verdict |", "|---:|---|---:|---:|---|"]
    for row in result["ranking"][:top]:
        sd = row.get("seed_sd")
        score = f"{row['score']:.4f}" + (f" ± {sd:.4f}" if sd is not None and sd == sd else "")
        d = row.get("noninferiority") or {}
        delta = (f"{d['delta']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d.get("ci") and None not in d["ci"]
                 else "n/a")
        lines.append(f"| {row['rank']} | {row['leads_key']} | {score} | {delta} | {d.get('verdict', 'n/a')} |")
    n_ok = sum(1 for row in result["ranking"] if (row.get("noninferiority") or {}).get("noninferior"))
    lines += ["", f"{n_ok} of {len(result['ranking'])} subsets are non-inferior to 12 leads at this margin."]
    return "\n".join(lines) + "\n"

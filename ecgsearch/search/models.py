"""A lead search's models as MLflow models: one per lead count on the elimination path (RLE) or the
best-ranked k-subset (subsets), the seed ensemble its figures describe, reading only those leads;
the answer registered @champion.

Retrain mode: the models trained on each lead set. Eval mode: the one masked model reading the
set's leads (ML-ResNet skips the other branches), exactly as the search scored it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from ecgsearch.leads import leads_key

log = logging.getLogger("ecgsearch.search")


def log_lead_count_models(ctx, parent, by_n: Sequence[dict], set_units: Callable[[Any], list[dict]],
                          ans: dict, name: str) -> dict[str, Any]:
    """Save and log `models/<n>-leads` per lead count; register the answer's set (ans: {"leads",
    "n_leads"}, or no leads when none is non-inferior) as `name`@champion. Returns what was logged
    and registered (for rle.json / subsets.json)."""
    from ecgsearch.tracking.pyfunc import CHAMPION, save_pyfunc

    s, tr = ctx.s, ctx.tracker
    out: dict[str, Any] = {"models": {}}
    for e in by_n:
        units = set_units(e["leads"])
        ckpts = [ctx.checkpoint(u.get("model_leads", u["leads"]), u["seed"]) for u in units]
        keep = e["leads"] if units[0]["kind"] == "predict" else None
        dest = save_pyfunc(ckpts, Path(s.out) / "mlmodels" / f"{e['n_leads']}-leads", keep=keep)
        path = f"models/{e['n_leads']}-leads"
        tr.log_artifact(parent, dest, path)
        out["models"][str(e["n_leads"])] = {"leads": list(e["leads"]), "artifact": path,
                                            "folder": str(dest.relative_to(s.out))}
    if ans.get("leads") and str(ans["n_leads"]) in out["models"] and \
            leads_key(out["models"][str(ans["n_leads"])]["leads"]) == leads_key(ans["leads"]):
        entry = out["models"][str(ans["n_leads"])]
        version = tr.register_model(parent, entry["artifact"], name, wait_s=120, alias=CHAMPION,
                                    tags={"leads": leads_key(ans["leads"]), "n_leads": ans["n_leads"],
                                          "verdict": "non-inferior to 12 leads", "margin": s.margin})
        out.update(registered_model=name, version=version, alias=CHAMPION,
                   model_uri=f"models:/{name}@{CHAMPION}")
    else:
        log.info("no lead set is non-inferior to 12 leads: the per-count models are logged, none registered")
    return out

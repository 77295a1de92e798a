"""Recursive Lead Elimination: the greedy algorithm, free of training and I/O.

Each step starts from the current N leads, scores the N subsets of N-1 leads, and
removes the lead whose removal leaves the best score. Scoring is a pluggable callable,
so the algorithm is deterministic and unit-testable; the real scorer (train / drop a
branch / retrain per candidate, in parallel Ray Tune trials) lives in `runner.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ecgsearch.leads import LEADS, leads_key, parse_leads

MODES = ("max", "min")

# Scores closer than this are a tie. Metrics are computed in float32/float64 on a
# few thousand records; differences below 1e-9 are rounding, not signal.
TIE_TOL = 1e-9

_POS = {name: i for i, name in enumerate(LEADS)}


@dataclass(frozen=True)
class Candidate:
    removed: str                 # the lead left out
    leads: tuple[str, ...]       # the N-1 leads kept (canonical order)
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "leads": list(self.leads),
                "leads_key": leads_key(self.leads), "score": self.score}


@dataclass
class Step:
    index: int                   # 1-based
    leads: tuple[str, ...]       # the N leads this step starts from
    candidates: list[Candidate]  # in canonical order of the removed lead
    removed: str
    score: float                 # the winning candidate's score
    tied: list[str] = field(default_factory=list)  # leads whose removal tied with the winner

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(lead for lead in self.leads if lead != self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.index, "leads": list(self.leads), "n_leads": len(self.leads),
                "candidates": [c.to_dict() for c in self.candidates],
                "removed": self.removed, "score": self.score, "kept": list(self.kept),
                "tied": list(self.tied)}


def candidate_subsets(leads: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The N (removed lead, kept N-1 leads) pairs of one step, in canonical order."""
    current = parse_leads(leads)
    return [(lead, tuple(x for x in current if x != lead)) for lead in current]


def choose_removal(candidates: Sequence[Candidate], mode: str = "max") -> tuple[Candidate, list[str]]:
    """Pick the candidate with the best score; return it and the leads it tied with.

    Ties remove the lead that comes *last* in canonical order (V6 before V5 ... before I):
    the limb leads I and II are the ones nearly every reduced-lead device records, so a
    tie should keep them. The rule depends only on lead names, so it repeats exactly.
    """
    if mode not in MODES:
        raise ValueError(f"invalid score mode {mode!r}: choose max (AUPRC) or min (MAE)")
    if not candidates:
        raise ValueError("no candidates to choose from")
    sign = 1.0 if mode == "max" else -1.0
    best = max(sign * c.score for c in candidates)
    tied = [c for c in candidates if sign * c.score >= best - TIE_TOL]
    winner = max(tied, key=lambda c: _POS[c.removed])
    return winner, [c.removed for c in tied if c is not winner]


StepScorer = Callable[[int, tuple[str, ...], list[tuple[str, tuple[str, ...]]]], Mapping[str, float]]


def eliminate(start: Sequence[str], min_leads: int, score_step: StepScorer,
              mode: str = "max", on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Run RLE from `start` down to `min_leads` leads.

    `score_step(step_index, current_leads, [(removed, kept), ...])` returns a mapping
    removed lead -> score for every candidate. A missing or non-finite score is an error
    naming the step and lead: a candidate is never silently skipped.
    """
    current = parse_leads(start)
    if not 1 <= int(min_leads) < len(current):
        raise ValueError(f"invalid setting min_leads={min_leads}: must be between 1 and "
                         f"{len(current) - 1} for a start set of {len(current)} leads ({leads_key(current)})")
    steps: list[Step] = []
    while len(current) > min_leads:
        index = len(steps) + 1
        subsets = candidate_subsets(current)
        scores = score_step(index, current, subsets)
        cands = []
        for removed, kept in subsets:
            if removed not in scores:
                raise ValueError(f"step {index} ({leads_key(current)}): no score for the candidate "
                                 f"without {removed}")
            score = float(scores[removed])
            if not math.isfinite(score):
                raise ValueError(f"step {index} ({leads_key(current)}): candidate without {removed} "
                                 f"({leads_key(kept)}) scored {score}; check the validation fold "
                                 "has positives for every class")
            cands.append(Candidate(removed, kept, score))
        extra = sorted(set(scores) - {r for r, _ in subsets})
        if extra:
            raise ValueError(f"step {index}: scores for leads not in the current set: {', '.join(extra)}")
        winner, tied = choose_removal(cands, mode)
        step = Step(index, current, cands, winner.removed, winner.score, tied)
        steps.append(step)
        if on_step is not None:
            on_step(step)
        current = winner.leads
    return steps


def elimination_order(steps: Sequence[Step]) -> list[str]:
    """Leads in the order they were removed."""
    return [s.removed for s in steps]


def kept_after(steps: Sequence[Step], start: Sequence[str]) -> tuple[str, ...]:
    return steps[-1].kept if steps else parse_leads(start)

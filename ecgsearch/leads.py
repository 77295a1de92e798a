"""Lead names, label sets and lead-subset parsing shared by every layer.

A lead subset is a first-class setting everywhere. It is always normalised to
canonical order (I II III AVR AVL AVF V1-V6) so that ("V2", "I") and ("I", "V2")
name the same experiment, the same MLflow param and the same checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

LEADS: tuple[str, ...] = ("I", "II", "III", "AVR", "AVL", "AVF",
                          "V1", "V2", "V3", "V4", "V5", "V6")
RHYTHM_CODES: tuple[str, ...] = ("1AVB", "CRBBB", "CLBBB", "SBRAD", "AFIB", "STACH")
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
LABEL_SETS: dict[str, tuple[str, ...]] = {"rhythm": RHYTHM_CODES, "superclass": SUPERCLASSES}

# Reduced sets of the PhysioNet/CinC Challenge 2021, used as baselines by the lead search.
CHALLENGE_SUBSETS: dict[str, tuple[str, ...]] = {
    "12-lead": LEADS,
    "6-lead": ("I", "II", "III", "AVR", "AVL", "AVF"),
    "4-lead": ("I", "II", "III", "V2"),
    "3-lead": ("I", "II", "V2"),
    "2-lead": ("I", "II"),
}

_INDEX = {name: i for i, name in enumerate(LEADS)}


def normalize_lead_name(name: str) -> str:
    """Map a lead name as found in files (aVR, avl, 'v1 ') to its canonical name."""
    key = name.strip().upper()
    if key not in _INDEX:
        raise ValueError(f"unknown lead {name!r}; known leads: {' '.join(LEADS)}")
    return key


def parse_leads(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Parse "I,II,V2" or a sequence of names into a canonical-order tuple.

    None means all twelve leads. Duplicates and unknown names are errors, never dropped.
    """
    if spec is None:
        return LEADS
    names = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in (s.strip() for s in names) if n]
    if not names:
        raise ValueError("empty lead list; give lead names such as I,II,V2")
    canon = [normalize_lead_name(n) for n in names]
    dup = sorted({n for n in canon if canon.count(n) > 1})
    if dup:
        raise ValueError(f"lead(s) given more than once: {', '.join(dup)}")
    return tuple(sorted(canon, key=_INDEX.__getitem__))


def lead_indices(leads: Sequence[str], within: Sequence[str] = LEADS) -> list[int]:
    """Positions of `leads` inside the channel list `within` (errors name missing leads)."""
    pos = {n: i for i, n in enumerate(within)}
    missing = [n for n in leads if n not in pos]
    if missing:
        raise ValueError(f"lead(s) {', '.join(missing)} not among available leads {' '.join(within)}")
    return [pos[n] for n in leads]


def leads_key(leads: Sequence[str]) -> str:
    """Stable string for a subset: canonical order, comma-joined (MLflow param/tag value)."""
    return ",".join(parse_leads(leads))

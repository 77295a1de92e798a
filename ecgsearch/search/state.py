"""Resumable search state: a memo of finished work units, saved after every one.

The search is a deterministic function of its settings and the scores it gets back,
so the state does not need to record "where we were": it records each finished unit
(a training, a dropped-lead evaluation, a test evaluation) by a stable id. A resumed
search replays the algorithm, takes finished units from the memo and only runs the
rest, which is why it ends on the same path as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
VERSION = 2   # 2: units per training seed, predictions on disk


def _dump_atomic(path: Path, obj: Any) -> None:
    # Write-then-rename: a kill mid-write leaves the previous state, never a torn file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    _dump_atomic(path, obj)
    return path


def _diff(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, now) for every leaf that differs, e.g. ("config.lr", 0.001, 0.01)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            out += _diff(saved.get(k), now.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == now else [(prefix.rstrip("."), saved, now)]


@dataclass
class SearchState:
    path: Path
    fingerprint: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)   # e.g. MLflow run ids

    @classmethod
    def open(cls, out: str | Path, fingerprint: dict[str, Any], resume: bool) -> "SearchState":
        """Start fresh (refusing to overwrite finished work) or resume a matching search."""
        path = Path(out) / STATE_FILE
        fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples -> lists
        if not path.exists():
            if resume:
                raise FileNotFoundError(f"--resume: no search state at {path}; run without --resume to start")
            state = cls(path, fingerprint)
            state.save()
            return state
        if not resume:
            raise ValueError(f"{path} already holds a search; pass --resume to continue it or choose "
                             "another --out")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"search state {path} is not valid JSON: {exc}") from None
        if raw.get("version") != VERSION:
            raise ValueError(f"search state {path} has version {raw.get('version')!r}, expected {VERSION}")
        diff = _diff(raw["fingerprint"], fingerprint)
        if diff:
            details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff)
            raise ValueError(f"cannot resume {path}: settings differ from the saved search ({details})")
        return cls(path, fingerprint, dict(raw.get("results", {})), dict(raw.get("info", {})))

    def done(self, unit_id: str) -> bool:
        return unit_id in self.results

    def get(self, unit_id: str) -> dict[str, Any]:
        return self.results[unit_id]

    def record(self, unit_id: str, result: dict[str, Any]) -> None:
        self.results[unit_id] = result
        self.save()

    def set_info(self, key: str, value: Any) -> None:
        self.info[key] = value
        self.save()

    def save(self) -> None:
        _dump_atomic(self.path, {"version": VERSION, "fingerprint": self.fingerprint,
                                 "results": self.results, "info": self.info})

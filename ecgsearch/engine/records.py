"""Serving a checkpoint on ECGs nobody prepared for it: any leads, any length, many records.

A record's channels are matched to the model's leads by name, with the aliases of other
databases (MLII is lead II); channels that are no standard lead (Frank leads, respiration) are
ignored and listed. An ML-ResNet predicts from whichever of its leads the record has (the other
branches are skipped); a model that cannot drop leads refuses a record that lacks any, naming
them, unless `missing="mean"` is asked for: missing leads then enter at their training mean
(0 after normalisation), as the lead search scores such models, and the row says so.

Length: a record longer than the model's input is read as consecutive windows of the model's
length (`stride` samples apart at the model's rate; the last window is aligned to the record's
end, so every sample is seen) and its prediction is the mean of the windows' outputs; shorter
records are centre-padded as in training and flagged. Nothing is cropped silently.

Multi-label checkpoints carry per-class thresholds chosen on the validation fold (F1-max): each
class gets a call beside its probability. Age models give years.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecgsearch.data.errors import DataError
from ecgsearch.leads import LEADS, parse_leads

# Channel names of other databases that record one of the twelve standard leads.
LEAD_ALIASES: dict[str, str] = {
    "MLI": "I", "MLII": "II", "MLIII": "III",          # MIT-BIH, "modified limb lead"
    "DI": "I", "DII": "II", "DIII": "III", "D1": "I", "D2": "II", "D3": "III",
    "LEAD I": "I", "LEAD II": "II", "LEAD III": "III",
    "-AVR": None,                                       # inverted aVR (Cabrera) is not aVR: ignored
}
# Training pads a 10 s record to the model's multiple (1000 -> 1024 samples: 0.24 s); padding up
# to this much is how the model was trained and is not flagged as a short record.
SHORT_TOLERANCE_S = 0.5
MISSING_MODES = ("error", "mean")


def canonical_lead(name: str) -> str | None:
    """The standard lead a channel name records, or None for other channels."""
    key = " ".join(str(name).strip().upper().split())
    if key in LEAD_ALIASES:
        return LEAD_ALIASES[key]
    return key if key in LEADS else None


def match_channels(names: Sequence[str], record: str) -> tuple[dict[str, int], list[str]]:
    """({standard lead: channel index}, channels that are no standard lead)."""
    found: dict[str, int] = {}
    ignored: list[str] = []
    for i, n in enumerate(names):
        lead = canonical_lead(n)
        if lead is None:
            ignored.append(str(n).strip())
        elif lead in found:
            raise DataError(f"channels {names[found[lead]]!r} and {n!r} both record lead {lead}", record)
        else:
            found[lead] = i
    return found, ignored


def window_starts(n_total: int, n_window: int, stride: int) -> list[int]:
    """Starts of windows covering [0, n_total): every `stride`, plus one flush with the end."""
    if n_total <= n_window:
        return [0]
    starts = list(range(0, n_total - n_window + 1, stride))
    if starts[-1] + n_window < n_total:
        starts.append(n_total - n_window)
    return starts


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Record paths from arguments: records (with or without .hea), folders (every .hea beneath,
    sorted) and list files (.txt/.lst/.list: one record per line, relative to the file, # comments)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            heas = sorted(p.rglob("*.hea"))
            if not heas:
                raise DataError("folder holds no .hea record headers", str(p))
            out += [h.with_suffix("") for h in heas]
        elif p.suffix.lower() in (".txt", ".lst", ".list") and p.is_file():
            for line in p.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    q = Path(line)
                    out.append((q if q.is_absolute() else p.parent / q).with_suffix("")
                               if q.suffix == ".hea" else (q if q.is_absolute() else p.parent / q))
        else:
            out.append(p.with_suffix("") if p.suffix == ".hea" else p)
    return out


@dataclass
class PredictOptions:
    leads: tuple[str, ...] | None = None   # use only these leads of the record (on purpose)
    missing: str = "error"                 # model cannot drop leads: "error" or "mean" (documented fallback)
    stride: int | None = None              # window stride in samples at the model's rate; None: the window
    per_window: bool = False               # one row per window as well as the record's row
    batch_size: int = 64
    skip_bad: bool = False                 # report a bad record and go on with the rest

    def validate(self) -> None:
        if self.missing not in MISSING_MODES:
            raise ValueError(f"invalid setting missing={self.missing!r}: choose one of {', '.join(MISSING_MODES)}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"invalid setting stride={self.stride}: must be >= 1 sample")
        if int(self.batch_size) < 1:
            raise ValueError(f"invalid setting batch_size={self.batch_size}: must be >= 1")
        if self.leads is not None:
            self.leads = parse_leads(self.leads)


@dataclass
class PredictReport:
    rows: list[dict] = field(default_factory=list)          # one per record (and per window on request)
    failures: list[tuple[str, str]] = field(default_factory=list)   # (record, reason)
    output_names: tuple[str, ...] = ()
    thresholds: dict[str, float] | None = None


class RecordPredictor:
    """`RecordPredictor(ck, options)(paths, on_record=...)` -> PredictReport."""

    def __init__(self, ck, options: PredictOptions | None = None, device=None) -> None:
        from ecgsearch.engine.evaluate import Predictor, _as_checkpoint

        self.opt = options or PredictOptions()
        self.opt.validate()
        self.ck = _as_checkpoint(ck)
        self.device = device
        self._predictors: dict[tuple[str, ...], Predictor] = {}
        self._make = Predictor
        self.can_drop = hasattr(self.ck.model, "select_leads")
        self.task = self.ck.cfg.task
        if self.opt.leads is not None:
            extra = [x for x in self.opt.leads if x not in self.ck.leads]
            if extra:
                raise ValueError(f"--leads {','.join(extra)}: not among the model's leads {' '.join(self.ck.leads)}")
        self.n = int(self.ck.n_samples)
        self.stride = int(self.opt.stride or self.n)

    def predictor(self, leads: tuple[str, ...]):
        if leads not in self._predictors:
            self._predictors[leads] = self._make(self.ck, device=self.device,
                                                 keep=None if leads == tuple(self.ck.leads) else leads)
        return self._predictors[leads]

    # -- one record -> windows ------------------------------------------------------------
    def read(self, path: Path) -> dict:
        """Read and conform one record: its windows (w, leads, n) in mV and what was done to it."""
        from ecgsearch.data.signal import read_any_record, resample

        record = str(path)
        x, fs, names = read_any_record(path)
        found, ignored = match_channels(names, record)
        wanted = self.opt.leads or tuple(self.ck.leads)
        present = tuple(x for x in self.ck.leads if x in wanted and x in found)
        absent = [x for x in wanted if x not in found]
        if not present:
            raise DataError(f"none of the model's leads {' '.join(wanted)} is in the record "
                            f"(channels: {' '.join(map(str, names))})", record)
        note = []
        if absent:
            if not self.can_drop and self.opt.missing == "error":
                raise DataError(f"lead(s) {', '.join(absent)} missing (the record has {' '.join(map(str, names))}); "
                                f"{self.ck.cfg.model} cannot leave leads out: use an ML-ResNet checkpoint, or "
                                "--missing mean to enter them at their training mean", record)
            note.append(("branches skipped: " if self.can_drop else "at training mean: ") + ",".join(absent))
        sig = x[[found[lead] for lead in present]].astype(np.float64)
        if int(fs) != int(self.ck.fs):
            sig = resample(sig[None], int(fs), int(self.ck.fs))[0]
        t = sig.shape[-1]
        starts = window_starts(t, self.n, self.stride)
        if t < self.n:
            from ecgsearch.data.signal import pad_or_crop
            wins = pad_or_crop(sig[None], self.n)
        else:
            wins = np.stack([sig[:, s:s + self.n] for s in starts])
        padded_s = max(0, self.n - t) / self.ck.fs
        if padded_s > SHORT_TOLERANCE_S:
            note.append(f"short: {t / self.ck.fs:.1f} s padded to {self.n / self.ck.fs:.2f} s")
        return {"record": record, "fs_in": int(fs), "duration_s": round(x.shape[-1] / fs, 3), "leads": present,
                "ignored": ignored, "starts": starts, "x": wins.astype(np.float32),
                "short": padded_s > SHORT_TOLERANCE_S, "note": "; ".join(note)}

    # -- many records -------------------------------------------------------------------
    def __call__(self, paths: Sequence[str | Path], on_record: Callable[[], None] | None = None) -> PredictReport:
        report = PredictReport(output_names=tuple(self.predictor(tuple(self.ck.leads)).output_names),
                               thresholds=self.ck.thresholds)
        pending: dict[tuple[str, ...], list[dict]] = {}

        def flush(leads: tuple[str, ...]) -> None:
            items = pending.pop(leads, [])
            if not items:
                return
            out = self.predictor(leads)(np.concatenate([it["x"] for it in items]), batch_size=self.opt.batch_size)
            i = 0
            for it in items:
                k = len(it["x"])
                self._rows(report, it, out[i:i + k])
                i += k

        for path in expand_inputs(paths):
            try:
                item = self.read(Path(path))
            except Exception as exc:   # wfdb raises many kinds on a damaged file; each names this record
                reason = exc.reason if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
                if not self.opt.skip_bad:
                    raise DataError(reason, str(path)) from None
                report.failures.append((str(path), reason))
                if on_record:
                    on_record()
                continue
            pending.setdefault(item["leads"], []).append(item)
            if sum(len(it["x"]) for it in pending[item["leads"]]) >= self.opt.batch_size:
                flush(item["leads"])
            if on_record:
                on_record()
        for leads in list(pending):
            flush(leads)
        order = {str(p): i for i, p in enumerate(expand_inputs(paths))}
        report.rows.sort(key=lambda r: (order.get(r["record"], 0), r.get("window", -1)))
        return report

    def _rows(self, report: PredictReport, it: dict, out: np.ndarray) -> None:
        base = {"record": it["record"], "fs_in": it["fs_in"], "duration_s": it["duration_s"],
                "leads_used": ",".join(it["leads"]), "ignored_channels": ",".join(it["ignored"]),
                "windows": len(it["x"]), "short": it["short"], "note": it["note"]}
        if self.task_kind == "reconstruction":
            report.rows.append({**base, "reconstruction_shape": list(out.shape[1:])})
            return
        report.rows.append({**base, **self._values(out.mean(axis=0))})
        if self.opt.per_window and len(out) > 1:
            for w, (s, o) in enumerate(zip(it["starts"], out)):
                report.rows.append({**base, "window": w, "start_s": round(s / self.ck.fs, 3), **self._values(o)})

    @property
    def task_kind(self) -> str:
        return self.predictor(tuple(self.ck.leads)).prep.task.kind

    def _values(self, v: np.ndarray) -> dict:
        names = self.predictor(tuple(self.ck.leads)).output_names
        v = np.ravel(v)
        if self.task_kind == "regression":
            return {f"{n}_years" if n == "age" else n: round(float(x), 2) for n, x in zip(names, v)}
        row = {n: float(x) for n, x in zip(names, v)}
        if self.ck.thresholds:
            row.update({f"{n}_call": int(float(x) >= self.ck.thresholds[n]) for n, x in zip(names, v)
                        if n in self.ck.thresholds})
        return row


def write_rows(rows: list[dict], dest: str | Path) -> Path:
    """Rows as CSV or JSON, chosen by the file's suffix."""
    import csv
    import json

    dest = Path(dest)
    if dest.suffix.lower() == ".json":
        dest.write_text(json.dumps(rows, indent=2) + "\n")
        return dest
    if dest.suffix.lower() != ".csv":
        raise ValueError(f"--out {dest}: give a .csv or .json file")
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with dest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return dest

"""`Tracker`: what studies and searches call. Every method but `parent` only queues work for the
writer thread and returns at once; `parent` waits (bounded) because its run id goes into the
caller's own state (study.json, state.json) for `--resume`."""
from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgsearch.tracking.store import STATUSES, TrackingError, bound_http_calls, numeric, now_ms, param_values
from ecgsearch.tracking.writer import Call, Run, Writer

log = logging.getLogger("ecgsearch.tracking")

BACKLOG_FILE = "tracking_backlog.json"
SPOOL_DIR = "tracking_spool"
# Tags a child run takes from its parent unless given its own: any run can be filtered by them.
SCOPE_TAGS = ("study", "search", "task", "model")
_live: dict[str, "Tracker"] = {}


def live(out: str | Path) -> "Tracker | None":
    """The open tracker of the study in `out` in this process (Tune hands its callbacks back
    unpickled, so they find the tracker here instead of holding one)."""
    return _live.get(str(Path(out).resolve()))


def root_cause(err: BaseException | str) -> str:
    """Ray wraps a trial's exception in several tracebacks; the last line is what went wrong."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else (type(err).__name__ if isinstance(err, BaseException) else "unknown error")


def _error_texts(err: BaseException | str) -> tuple[str, str]:
    if isinstance(err, BaseException):
        full = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return f"{type(err).__name__}: {root_cause(err)}", full
    return root_cause(err), str(err)


@dataclass
class Report:
    """What a closed tracker could not log: still queued (in order) and rejected by the store."""

    pending: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    backlog: Path | None = None

    @property
    def problems(self) -> int:
        return len(self.pending) + len(self.rejected)


class NullTracker:
    """Tracking disabled (`--no-tracking`): every method accepts run None and does nothing."""

    enabled = False
    uri: str | None = None
    experiment: str | None = None

    def parent(self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
               run_id: str | None = None) -> str | None:
        return None

    def child(self, parent, name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
              finish: bool = True):
        return None

    def log_metrics(self, run, metrics: Mapping[str, Any], step: int = 0) -> None:
        pass

    def log_params(self, run, params: Mapping[str, Any]) -> None:
        pass

    def log_config(self, run, config: Mapping[str, Any]) -> None:
        pass

    def log_artifacts(self, run, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        pass

    def log_artifact(self, run, path: str | Path, artifact_path: str | None = None, *, move: bool = False) -> None:
        pass

    def log_dict(self, run, obj: Any, artifact_file: str) -> None:
        pass

    def tag(self, run, key: str, value: Any) -> None:
        pass

    def tags(self, run, tags: Mapping[str, Any]) -> None:
        pass

    def end(self, run, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        pass

    def close_stale_children(self, run, status: str = "KILLED") -> None:
        pass

    def settle_children(self, run, statuses: Mapping[str, str], others: str | None = "KILLED") -> None:
        pass

    def run_id(self, run, parent=None, wait_s: float = 30.0) -> str | None:
        return None

    def register_model(self, run, artifact_path: str, name: str, tags: Mapping[str, Any] | None = None,
                       wait_s: float = 60.0, alias: str | None = None) -> str | None:
        return None

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, wait_s: float | None = None) -> Report:
        return Report()


class Tracker(NullTracker):
    """Runs in one experiment of one store, written by a background `Writer`.

    out: the study's/search's folder: the backlog (OUT/tracking_backlog.json) and artifacts
    handed over with move=True (OUT/tracking_spool/) live there; an earlier session's backlog
    found there is replayed first.
    """

    enabled = True

    def __init__(self, uri: str, experiment: str, out: str | Path | None = None, *, retry_s: float = 15.0,
                 close_wait_s: float = 120.0) -> None:
        bound_http_calls()
        self.uri, self.experiment, self.close_wait_s = uri, experiment, close_wait_s
        self.out = Path(out).resolve() if out is not None else None
        self.spool = self.out / SPOOL_DIR if self.out else Path(tempfile.mkdtemp(prefix="ecgsearch-spool-"))
        self.writer = Writer(uri, self.out / BACKLOG_FILE if self.out else None, retry_s=retry_s)
        replayed = self.writer.load_backlog()
        if replayed:
            log.info("replaying %d MLflow call(s) an earlier session could not log (%s)", replayed,
                     self.out / BACKLOG_FILE)
        self._scope: dict[str, dict[str, str]] = {}    # run ref -> the tags its children inherit
        self._reuse: set[str] = set()                   # runs whose children may exist already (resume)
        self._named: dict[tuple[str | None, str], tuple[Run, Call]] = {}
        self._report: Report | None = None
        if self.out is not None:
            _live[str(self.out)] = self

    # -- runs ---------------------------------------------------------------------------
    @staticmethod
    def _ref(run: Run | str | None) -> str | None:
        return run.key if isinstance(run, Run) else run

    def _submit(self, op: str, run, **args: Any) -> Call:
        return self.writer.submit(Call(op, run, args))

    def parent(self, name, params=None, tags=None, run_id=None):
        """A top-level run; a fresh one unless `run_id` (saved by the caller) reopens its own.

        Never found by name: a new study on a shared server must not take over an older one's.
        Waits for the create (at most 60 s) and raises TrackingError when the store refuses it:
        this runs before any training, right after `preflight`.
        """
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if run_id is not None:
            self._reuse.add(run_id)
            self._submit("reopen", run_id)
            self._submit("close_stale_children", run_id, status="KILLED")
            self.tags(run_id, tags)
            ref = run_id
        else:
            run = Run(name, self.experiment)
            call = self._submit("create", run, tags=tags, reuse=False)
            if not self.writer.wait(call, 60.0):
                why = call.error or self.writer.offline or "no answer within 60 s"
                raise TrackingError(f"could not create MLflow run {name!r} at {self.uri}: {why}; check the "
                                    "tracking server, or pass another --tracking-uri / MLFLOW_TRACKING_URI")
            ref = run_id = run.id
        self._scope[ref] = {k: v for k, v in tags.items() if k in SCOPE_TAGS}
        if params:
            self.log_params(run_id, params)
        return run_id

    def child(self, parent, name, params=None, tags=None, metrics=None, finish=True):
        """A run under `parent` (a handle or a run id), returned as a handle at once."""
        pref = self._ref(parent)
        inherited = self._scope.get(pref, {})
        tags = {**inherited, **{k: str(v) for k, v in (tags or {}).items()}}
        run = Run(name, self.experiment, parent)
        reuse = pref in self._reuse
        call = self._submit("create", run, tags=tags, reuse=reuse)
        if reuse:
            self._reuse.add(run.key)
        self._scope[run.key] = {k: v for k, v in tags.items() if k in SCOPE_TAGS}
        self._named[(pref, name)] = (run, call)
        if params:
            self.log_params(run, params)
        if metrics:
            self.log_metrics(run, metrics)
        if finish:
            self.end(run, "FINISHED")
        return run

    def end(self, run, status="FINISHED", error=None):
        """End a run in its true status; with `error`, a FAILED/KILLED run also gets an `error`
        tag (the root cause) and the whole text as error.txt."""
        if status not in STATUSES:
            raise ValueError(f"run status {status!r}: choose one of {', '.join(STATUSES)}")
        if run is None:
            return
        if error is not None:
            line, full = _error_texts(error)
            self.tags(run, {"error": line})
            self._submit("log_text", run, text=full, artifact_file="error.txt")
        self._submit("end", run, status=status)

    def close_stale_children(self, run, status="KILLED"):
        if run is not None:
            self._submit("close_stale_children", run, status=status)

    def settle_children(self, run, statuses, others="KILLED"):
        """End children by name in their known status (a resumed study's ledger); others still
        RUNNING in `others`. Queued after everything before it, so it has the last word."""
        if run is not None:
            self._submit("settle_children", run, statuses=dict(statuses), others=others)

    # -- logging ------------------------------------------------------------------------
    def log_params(self, run, params):
        if run is not None and params:
            self._submit("log_params", run, params=param_values(params))

    def log_config(self, run, config):
        """The whole config as dotted `cfg.*` params and as config.json."""
        if run is not None:
            self.log_params(run, {f"cfg.{k}": v for k, v in config.items()})
            self.log_dict(run, dict(config), "config.json")

    def log_metrics(self, run, metrics, step=0):
        values = numeric(metrics)
        if run is not None and values:
            self._submit("log_metrics", run, metrics=values, step=int(step), timestamp_ms=now_ms())

    def tag(self, run, key, value):
        self.tags(run, {key: value})

    def tags(self, run, tags):
        if run is not None and tags:
            self._submit("set_tags", run, tags={k: str(v) for k, v in tags.items()})

    def log_artifacts(self, run, paths, artifact_path=None):
        for p in paths:
            self.log_artifact(run, p, artifact_path)

    def log_artifact(self, run, path, artifact_path=None, *, move=False):
        """Log a file that stays where it is until written; move=True hands the file over
        (it is moved into the spool folder now: for files in a folder about to be deleted)."""
        if run is None:
            return
        path = Path(path).resolve()
        if move:
            dest = self.spool / uuid.uuid4().hex / path.name
            dest.parent.mkdir(parents=True)
            shutil.move(str(path), dest)
            path = dest
        self._submit("log_artifact", run, path=str(path), artifact_path=artifact_path, spooled=move)

    def log_dict(self, run, obj, artifact_file):
        if run is not None:
            self._submit("log_dict", run, obj=obj, artifact_file=artifact_file)

    # -- answers ------------------------------------------------------------------------
    def run_id(self, run, parent=None, wait_s=30.0):
        """The MLflow id of a handle, or of the child `run` (a name) of `parent`; None when the
        store has not answered within `wait_s` (at once, when it is known to be down)."""
        if isinstance(run, str) and parent is None:
            return run
        if isinstance(run, Run):
            known = next(((r, c) for r, c in self._named.values() if r is run), None)
        else:
            known = self._named.get((self._ref(parent), run))
        if known is not None:
            handle, call = known
            self.writer.wait(call, wait_s)
            return handle.id
        call = self._submit("find", parent, experiment=self.experiment, name=run)
        return call.result if self.writer.wait(call, wait_s) else None

    def register_model(self, run, artifact_path, name, tags=None, wait_s=60.0, alias=None):
        """Register `<run artifacts>/<artifact_path>` as a version of `name` (`alias`, e.g.
        "champion", then points at it); the version, or None when not done within `wait_s` (the
        call stays queued; it is idempotent on replay)."""
        call = self._submit("register_model", run, artifact_path=artifact_path, name=name,
                            tags={k: str(v) for k, v in (tags or {}).items()}, alias=alias)
        return call.result if self.writer.wait(call, wait_s) else None

    def flush(self, timeout_s=30.0):
        return self.writer.flush(timeout_s)

    def close(self, wait_s=None):
        """Drain (bounded), stop the writer, list what is still unlogged: the backlog file
        and one log line. Safe to call twice."""
        if self._report is not None:
            return self._report
        left = self.writer.close(self.close_wait_s if wait_s is None else wait_s)
        backlog = self.writer.backlog if (left or self.writer.rejected) and self.writer.backlog else None
        self._report = Report([c.describe() for c in left], [c.describe() for c in self.writer.rejected], backlog)
        if self.out is not None:
            _live.pop(str(self.out), None)
        if not left and self.spool.exists():
            shutil.rmtree(self.spool, ignore_errors=True)
        if self._report.problems:
            runs = {c["run"] for c in self._report.pending + self._report.rejected}
            where = f"listed in {backlog}" if backlog else "no out folder to list them in"
            again = f"; `--resume` in {self.out} replays them" if left and backlog else ""
            log.warning("MLflow: %d call(s) on %d run(s) not logged to %s (%d waiting%s, %d rejected); %s%s",
                        self._report.problems, len(runs), self.uri, len(left),
                        f": {self.writer.offline}" if self.writer.offline else "", len(self.writer.rejected),
                        where, again)
        return self._report

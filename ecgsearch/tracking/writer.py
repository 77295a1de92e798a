"""The background writer: every MLflow call of a process goes through one queue and one thread.

Why: Tune calls its callbacks on its event loop and the search logs from its driver; an MLflow
call that blocks there (a dead server costs minutes per call with MLflow's default retries)
stalls scheduling for the whole study. Here a caller only appends a `Call` and returns.

- Order: calls run strictly first in, first out, so a run's create precedes its metrics and
  its end, and a child's create follows its parent's.
- Placeholders: `Run` is the caller's handle for a run the writer has yet to create; later
  calls name the handle and the writer reads its `id` when it runs them.
- A failing call is classified by probing the store (`health`): if the store does not answer,
  the writer goes offline, keeps the call at the head of the queue and probes again every
  `retry_s`; when the store answers it replays everything in order. If the store answers,
  the call itself is at fault: it is tried once more, then set aside as rejected.
- `close(wait_s)` drains with a bounded wait (at once, when the store is known to be down) and
  writes what is still unlogged, in order, to the backlog file; a writer started later on
  the same file (`--resume` in the same out folder) replays it first.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgsearch.tracking.store import Store, health

log = logging.getLogger("ecgsearch.tracking")

BACKLOG_FORMAT = "ecgsearch.tracking_backlog/1"
THREAD_NAME = "ecgsearch-tracking"
_ATTEMPTS_WHEN_ONLINE = 2    # a call the live store refuses twice is the call's fault
_keys = itertools.count(1)


@dataclass(eq=False)
class Run:
    """A run as the caller sees it: `id` is None until the writer's create succeeds."""

    name: str
    experiment: str
    parent: "Run | str | None" = None
    id: str | None = None
    key: str = field(default_factory=lambda: f"{os.getpid()}-{next(_keys)}")
    failed: str | None = None    # why its create was rejected (its later calls are skipped)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, id={self.id})"


@dataclass(eq=False)
class Call:
    op: str                      # a Store method, or "create" / "reopen"
    run: Run | str | None        # the run it acts on (a handle or a known run id)
    args: dict[str, Any]
    result: Any = None
    error: str | None = None
    attempts: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        run = self.run
        return {"call": self.op, "run": run.name if isinstance(run, Run) else run,
                "run_id": run.id if isinstance(run, Run) else run,
                **({"error": self.error} if self.error else {})}


class _QuietRetries(logging.Filter):
    """urllib3 warns on every retry; the writer's retries are expected and it says so itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != THREAD_NAME


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


def _run_id(run: Run | str | None) -> str | None:
    return run.id if isinstance(run, Run) else run


class Writer:
    def __init__(self, uri: str, backlog: Path | None, *, retry_s: float = 15.0) -> None:
        self.uri, self.backlog, self.retry_s = uri, backlog, retry_s
        self._store: Store | None = None
        self._queue: deque[Call] = deque()
        self.rejected: list[Call] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.offline: str | None = None    # why the store does not answer, while it does not
        self._backlog_on_disk = False      # the file lists calls that may since have been written
        self._next_probe = 0.0
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------
    def submit(self, call: Call) -> Call:
        with self._cv:
            if not self._stopping:
                self._queue.append(call)
                self._cv.notify_all()
                return call
        # Too late to log (the tracker was closed): say so, never raise into the caller's work.
        call.error = "the tracker was already closed"
        log.error("MLflow call %s on run %s after close: not logged", call.op, call.describe()["run"])
        call.done.set()
        return call

    def wait(self, call: Call, timeout_s: float) -> bool:
        """Wait for `call`, at most `timeout_s`, and not at all while the store is down."""
        deadline = time.monotonic() + timeout_s
        while not call.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.offline:
                return False
            call.done.wait(min(left, 0.2))
        return call.error is None

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def flush(self, timeout_s: float) -> bool:
        """True when everything submitted so far is written (or rejected) within `timeout_s`."""
        with self._cv:
            last = self._queue[-1] if self._queue else None
        return last is None or self.wait(last, timeout_s) or last.done.is_set()

    def close(self, wait_s: float) -> list[Call]:
        """Drain for at most `wait_s` (one last probe if offline), stop, return what is left."""
        with self._cv:
            if self.offline:
                self._next_probe = 0.0      # one more try now, not in retry_s
            self._cv.notify_all()
        deadline = time.monotonic() + wait_s
        while self.pending() and time.monotonic() < deadline:
            if self.offline and self._next_probe > time.monotonic():
                break                       # the last probe failed: the store is still down
            time.sleep(0.1)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=min(15.0, max(1.0, deadline - time.monotonic())))
        with self._cv:
            left = list(self._queue)
        self.write_backlog(left)
        return left

    # -- writer thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (not self._queue or
                                              (self.offline and time.monotonic() < self._next_probe)):
                    wait = None if not self._queue else max(0.05, self._next_probe - time.monotonic())
                    self._cv.wait(wait)
                if self._stopping:
                    return
                call = self._queue[0]
            if self.offline and not self._probe():
                continue
            self._attempt(call)

    def _probe(self) -> bool:
        reason = self._unreachable()
        if reason is None:
            log.warning("MLflow at %s answers again: replaying %d unlogged call(s)", self.uri, self.pending())
            self.offline = None
            return True
        self._offline(reason)
        return False

    def _offline(self, reason: str) -> None:
        if not self.offline:
            log.warning("MLflow at %s does not answer (%s): work goes on; %d call(s) wait, retried every "
                        "%.0f s", self.uri, reason, self.pending(), self.retry_s)
        self.offline = reason
        self._next_probe = time.monotonic() + self.retry_s
        with self._cv:
            left = list(self._queue)
        self.write_backlog(left)   # a driver killed while offline still leaves its backlog

    def _unreachable(self) -> str | None:
        if self.uri.startswith(("http://", "https://")):
            return health(self.uri)
        try:
            self.store.client.search_experiments(max_results=1)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.uri)
        return self._store

    def _attempt(self, call: Call) -> None:
        try:
            call.result = self._execute(call)
        except Exception as exc:
            reason = None if isinstance(exc, _Skipped) else self._unreachable()
            if reason is not None:
                self._offline(reason)
                return
            call.attempts += 1
            if call.attempts < _ATTEMPTS_WHEN_ONLINE and not isinstance(exc, _Skipped):
                return
            call.error = f"{type(exc).__name__}: {exc}"
            log.error("MLflow rejected %s on run %s: %s", call.op, call.describe()["run"], call.error)
            if call.op == "create" and isinstance(call.run, Run):
                call.run.failed = call.error
            self.rejected.append(call)
        with self._cv:
            self._queue.popleft()
            drained = not self._queue
        call.done.set()
        if drained and self._backlog_on_disk:
            # Caught up: a stale file would make a later --resume replay calls already written.
            self.write_backlog([])

    def _execute(self, call: Call) -> Any:
        run, a, s = call.run, call.args, self.store
        if isinstance(run, Run) and run.failed and call.op != "create":
            raise _Skipped(f"its run {run.name!r} was never created ({run.failed})")
        if call.op == "create":
            assert isinstance(run, Run)
            parent = run.parent
            if isinstance(parent, Run) and parent.id is None:
                raise _Skipped(f"its parent run {parent.name!r} was never created")
            run.id = s.create_run(run.experiment, run.name, _run_id(parent), a["tags"], a["reuse"])
            return run.id
        if call.op == "find":
            found = s.find_run(a["experiment"], a["name"], _run_id(run))
            return found.info.run_id if found else None
        run_id = _run_id(run)
        if call.op == "reopen":
            return s.reopen(run_id)
        if call.op == "log_artifact" and a.get("spooled"):
            s.log_artifact(run_id, a["path"], a.get("artifact_path"))
            shutil.rmtree(Path(a["path"]).parent, ignore_errors=True)
            return None
        kwargs = {k: v for k, v in a.items() if k != "spooled"}
        return getattr(s, call.op)(run_id, **kwargs)

    # -- backlog ------------------------------------------------------------------------
    def write_backlog(self, left: list[Call]) -> None:
        if self.backlog is None:
            return
        if not left and not self.rejected:
            self.backlog.unlink(missing_ok=True)
            self._backlog_on_disk = False
            return
        self._backlog_on_disk = bool(left)   # pending calls in the file can go stale; rejected ones cannot
        runs: dict[str, dict] = {}

        def ref(run: Run | str | None) -> str | None:
            if not isinstance(run, Run):
                return run
            if run.key not in runs:
                runs[run.key] = {"name": run.name, "experiment": run.experiment, "id": run.id,
                                 "parent": None}
                runs[run.key]["parent"] = ref(run.parent)
            return run.key

        calls = [{"call": c.op, "run": ref(c.run), "args": c.args} for c in left]
        doc = {"format": BACKLOG_FORMAT, "tracking_uri": self.uri, "written": round(time.time(), 3),
               "note": "MLflow calls not logged yet, in order; `--resume` in this folder replays them",
               "runs": runs, "calls": calls, "rejected": [c.describe() for c in self.rejected]}
        tmp = self.backlog.with_name(self.backlog.name + f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.backlog)

    def load_backlog(self) -> int:
        """Queue the calls an earlier session left in the backlog file (before any new call)."""
        if self.backlog is None or not self.backlog.exists():
            return 0
        try:
            doc = json.loads(self.backlog.read_text())
        except json.JSONDecodeError as exc:
            log.error("tracking backlog %s is not valid JSON (%s): not replayed", self.backlog, exc)
            return 0
        if doc.get("format") != BACKLOG_FORMAT or doc.get("tracking_uri") != self.uri:
            log.error("tracking backlog %s is for %s, not %s: not replayed", self.backlog,
                      doc.get("tracking_uri"), self.uri)
            return 0
        handles: dict[str, Run] = {}

        def handle(key: str | None) -> Run | str | None:
            if key is None or key not in doc["runs"]:
                return key                     # a plain run id (or None)
            if key not in handles:
                r = doc["runs"][key]
                handles[key] = Run(r["name"], r["experiment"], None, r["id"], key=key)
                handles[key].parent = handle(r["parent"])
            return handles[key]

        calls = []
        for c in doc["calls"]:
            args = dict(c["args"])
            if c["call"] == "create":
                args["reuse"] = True   # it may have succeeded just before the last session died
            calls.append(Call(c["call"], handle(c["run"]), args))
        self.rejected.extend(_Rejected(r) for r in doc.get("rejected", []))
        self._backlog_on_disk = True
        with self._cv:
            self._queue.extendleft(reversed(calls))
            self._cv.notify_all()
        return len(calls)


class _Skipped(Exception):
    """A call that cannot run because an earlier one it depends on was rejected."""


class _Rejected(Call):
    """A call an earlier session's store rejected: still listed, never retried."""

    def __init__(self, row: dict) -> None:
        super().__init__(row.get("call", "?"), row.get("run_id") or row.get("run"), {})
        self.row = row

    def describe(self) -> dict[str, Any]:
        return self.row

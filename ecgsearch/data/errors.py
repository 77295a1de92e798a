"""The one exception type of the data layer.

`DataError` subclasses `ValueError` so the CLI dispatcher reports it as a user error
(exit code 2, no traceback). Every message names the record (ecg_id and/or path) or
the file/column at fault, and what is wrong with it.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data. `record` and `reason` are kept apart for skip lists.

    `record` is a short identifier ("ecg_id 17 (records100/00000/00017_lr)") or None
    for faults that concern a whole file; `reason` is the fault without the record.
    """

    def __init__(self, reason: str, record: str | None = None):
        self.record = record
        self.reason = reason
        super().__init__(f"{record}: {reason}" if record else reason)


def record_label(ecg_id: int | None, path: str | None) -> str:
    """How errors name a record: ecg_id and relative path where both are known."""
    if ecg_id is not None and path:
        return f"ecg_id {ecg_id} ({path})"
    if ecg_id is not None:
        return f"ecg_id {ecg_id}"
    return str(path)

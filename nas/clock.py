"""The time files record (a checkpoint's `created`, a result's `date`): UTC, ISO 8601, to
the second."""

from __future__ import annotations

from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

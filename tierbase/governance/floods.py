"""Failed attempts folded per source and minute, so that a flood cannot grow the audit trail without bound.

The first failure of a (source, action) in a window is appended at once: the
trail names the source as soon as it starts. The rest of that window are only
counted, and written as one summary record when the window closes (a timer)
or on ``flush()``. Each record carries ``after.count``; their sum is the
number of failures. A window is a minute of the wall clock, so "how many from
this address at 10:41" is one record to read.

Distinct keys per window are capped: beyond ``max_keys`` the failures of new
sources fold into the source ``*``, so even a flood from many addresses
writes at most ``2 * (max_keys + 1)`` records per action and window.

Thread-safe: the API calls it from its worker threads, the proxy through
``asyncio.to_thread``. Records are appended while holding the lock, so that a
window's summary can never be written before its first record.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OTHERS = "*"
MAX_REASONS = 8   # distinct reasons kept per summary; reasons are ours, but keep a summary small anyway

log = logging.getLogger("tierbase.audit")


@dataclass
class _Window:
    start: float
    actor: str
    folded: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class FailureAggregator:
    def __init__(self, append: Callable[..., int], *, window: float = 60.0,
                 clock: Callable[[], float] = time.time, max_keys: int = 1000) -> None:
        self._append = append   # AuditLog.append
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Window] = {}
        self._timer: threading.Timer | None = None

    def note(self, source: str, actor: str, action: str, reason: str) -> None:
        now = self.clock()
        start = now - now % self.window
        with self._lock:
            self._close(before=start)
            key = (source, action)
            if key not in self._open and len(self._open) >= self.max_keys:
                key = (OTHERS, action)
            w = self._open.get(key)
            if w is None:  # appended before the window opens: if the append fails, the next failure is first
                self._append(actor=actor, action=action, target=key[0], allowed=False, reason=reason,
                             outcome="refused", after={"count": 1, "source": key[0]})
                self._open[key] = _Window(start, actor)
                return
            w.folded += 1
            w.reasons[reason if reason in w.reasons or len(w.reasons) < MAX_REASONS else "other"] += 1
            self._arm(w.start + self.window)

    def flush(self) -> int:
        """Write every pending summary now (service shutdown, tests); returns how many records."""
        with self._lock:
            return self._close(before=math.inf)

    def pending(self) -> int:
        """Failures counted but not yet written."""
        with self._lock:
            return sum(w.folded for w in self._open.values())

    def _close(self, before: float) -> int:
        """Drop the windows that started before ``before``, writing the summary of those that folded some."""
        written = 0
        for key, w in list(self._open.items()):
            if w.start >= before:
                continue
            if w.folded:  # written before it is dropped: a failed append keeps the count for the next try
                self._append(actor=w.actor, action=key[1], target=key[0], allowed=False, outcome="refused",
                             reason=f"{w.folded} more failed {key[1]} attempts from {key[0]} "
                                    f"in the {self.window:g} s from {_stamp(w.start)}",
                             after=self._summary(key[0], w))
                written += 1
            del self._open[key]
        return written

    def _summary(self, source: str, w: _Window) -> dict[str, Any]:
        return {"count": w.folded, "source": source, "from": w.start, "to": w.start + self.window,
                "reasons": dict(w.reasons), "summary": True}

    def _arm(self, at: float) -> None:
        """Make sure a timer closes the window ending at ``at`` even if no further failure comes."""
        if self._timer is not None and self._timer.is_alive():
            return
        self._timer = threading.Timer(max(0.0, at - self.clock()) + 0.05, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        now = self.clock()
        with self._lock:
            self._timer = None
            try:
                self._close(before=now - now % self.window)
            except Exception:  # a timer thread must not die loudly (the data dir may be gone: `down --purge`)
                log.warning("could not write the folded failures' summary", exc_info=True)
                return
            ends = [w.start + self.window for w in self._open.values() if w.folded]
            if ends:
                self._arm(min(ends))


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))

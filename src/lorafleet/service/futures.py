"""Request futures: request_id -> pending / result / error, with long-polling.

The worker thread completes futures; HTTP handlers wait on them (asyncio) or tests wait
synchronously (a condition variable). Finished entries are kept for ``keep_s`` seconds so a
client that lost a response can poll again.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """A finished request: JSON (``json``) or bytes with a content type (protobuf)."""

    json: Any = None
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass
class Failure:
    error: str
    category: str = "user"  # "user" | "server" | "unknown"


@dataclass
class _Entry:
    tenant: str
    kind: str
    created: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    outcome: Result | Failure | None = None
    waiters: list = field(default_factory=list)  # (loop, asyncio.Event)


class FutureStore:
    def __init__(self, keep_s: float = 600.0):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._counter = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.keep_s = keep_s

    def create(self, tenant: str, kind: str) -> str:
        rid = f"{self._prefix}-{next(self._counter)}"
        with self._lock:
            self._purge_locked()
            self._entries[rid] = _Entry(tenant, kind)
        return rid

    def complete(self, rid: str, outcome: Result | Failure) -> None:
        with self._lock:
            e = self._entries.get(rid)
            if e is None or e.outcome is not None:
                return
            e.outcome, e.done_at = outcome, time.monotonic()
            waiters, e.waiters = e.waiters, []
            self._cond.notify_all()
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    def owner(self, rid: str) -> str | None:
        with self._lock:
            e = self._entries.get(rid)
            return None if e is None else e.tenant

    def peek(self, rid: str):
        with self._lock:
            e = self._entries.get(rid)
            return None if e is None else e.outcome

    async def wait(self, rid: str, timeout: float):
        """The outcome, or None if still pending after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._lock:
            e = self._entries.get(rid)
            if e is None:
                raise KeyError(rid)
            if e.outcome is not None:
                return e.outcome
            e.waiters.append((loop, ev))
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        with self._lock:
            e = self._entries.get(rid)
            if e is not None and (loop, ev) in e.waiters:
                e.waiters.remove((loop, ev))
            return None if e is None else e.outcome

    def wait_sync(self, rid: str, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                e = self._entries.get(rid)
                if e is None:
                    raise KeyError(rid)
                if e.outcome is not None:
                    return e.outcome
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def pending_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.outcome is None)

    def _purge_locked(self):
        now = time.monotonic()
        old = [k for k, e in self._entries.items() if e.done_at is not None and now - e.done_at > self.keep_s]
        for k in old:
            del self._entries[k]

"""Request futures: request_id -> pending / result / error, with long-polling.

The worker thread completes futures; HTTP handlers wait on them (asyncio) or tests wait
synchronously (a condition variable). Finished entries are kept for ``keep_s`` seconds so a
client that lost a response can poll again.

With a journal (the service's `Store`), every request is recorded when it is accepted and its
outcome when it finishes, so after a restart a poll still gets a finished request's result,
and a request the dead process never finished raises `Lost` (HTTP 410: the SDK treats it as
retryable) instead of an unknown id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .store import RequestRecord


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
    # retryable: a passing failure (the rollout engine failed this time): retrieve_future answers
    # 410, on which the SDK sends the request again by itself. Not journaled: after a restart the
    # failure reads as final (the client's own retry still works).
    retryable: bool = False


class Lost(Exception):
    """A request accepted by a previous server process that died before finishing it."""


@dataclass
class _Entry:
    tenant: str
    kind: str
    durable: bool = True
    created: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    outcome: Result | Failure | None = None
    waiters: list = field(default_factory=list)  # (loop, asyncio.Event)


class FutureStore:
    def __init__(self, keep_s: float = 600.0, journal=None):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._counter = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]  # a new prefix per process: ids never repeat across restarts
        self.keep_s = keep_s
        self.journal = journal
        self._journal_purged = time.monotonic()

    def create(self, tenant: str, kind: str, model_id: str | None = None, seq_id: int | None = None,
               durable: bool = True) -> str:
        """A new pending request; ``durable=False``: not journaled (the service's own internal work)."""
        rid = f"{self._prefix}-{next(self._counter)}"
        if self.journal is not None and durable:
            self.journal.add_request(RequestRecord(rid, tenant, kind, model_id, seq_id))
        with self._lock:
            self._purge_locked()
            self._entries[rid] = _Entry(tenant, kind, durable)
        return rid

    def complete(self, rid: str, outcome: Result | Failure) -> None:
        with self._lock:
            e = self._entries.get(rid)
            if e is None or e.outcome is not None:
                return
        if self.journal is not None and e.durable:
            self._journal_outcome(rid, e, outcome)
        with self._lock:
            if e.outcome is not None:
                return
            e.outcome, e.done_at = outcome, time.monotonic()
            waiters, e.waiters = e.waiters, []
            self._cond.notify_all()
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    def _journal_outcome(self, rid: str, e: _Entry, outcome) -> None:
        r = RequestRecord(rid, e.tenant, e.kind)
        if isinstance(outcome, Failure):
            r.status, r.error, r.category = "failed", outcome.error, outcome.category
        else:
            r.status, r.content_type = "done", outcome.content_type
            r.body = outcome.body if outcome.body is not None else json.dumps(outcome.json).encode()
        self.journal.finish_request(r)

    def _from_journal(self, rid: str):
        """The outcome of a request an earlier process accepted (Lost if it never finished)."""
        r = self.journal.get_request(rid) if self.journal is not None else None
        if r is None:
            raise KeyError(rid)
        if r.status == "done":
            if r.content_type == "application/json":
                return Result(json=json.loads(r.body))
            return Result(body=bytes(r.body), content_type=r.content_type)
        if r.status == "failed":
            return Failure(r.error, r.category or "unknown")
        raise Lost(r.error or f"request {rid} was lost when the server restarted; send it again")

    def owner(self, rid: str) -> str | None:
        with self._lock:
            e = self._entries.get(rid)
            if e is not None:
                return e.tenant
        r = self.journal.get_request(rid) if self.journal is not None else None
        return None if r is None else r.tenant

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
            if e is not None and e.outcome is not None:
                return e.outcome
            if e is not None:
                e.waiters.append((loop, ev))
        if e is None:
            return self._from_journal(rid)
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

    def pending_of(self, tenant: str) -> int:
        """The tenant's accepted, unfinished, journaled requests (the service's own internal work,
        such as a job's steps, is not durable and not counted)."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.tenant == tenant and e.durable and e.outcome is None)

    def _purge_locked(self):
        now = time.monotonic()
        old = [k for k, e in self._entries.items() if e.done_at is not None and now - e.done_at > self.keep_s]
        for k in old:
            del self._entries[k]
        if self.journal is not None and now - self._journal_purged > 60:
            self._journal_purged = now
            self.journal.purge_requests(time.time() - self.keep_s)
